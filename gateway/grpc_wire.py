"""How gRPC requests come off the wire and errors go back onto it.

A request message that does not parse (corrupt wire format, a string field that is not UTF-8)
reaches the servicer as an `UndecodableRequest`, which `decoded` turns into a 400 (so the call
ends INVALID_ARGUMENT with the reason, where grpcio itself would answer UNKNOWN and name
protobuf's exception type). Status details are UTF-8 and metadata values ASCII: text quoted from
a request (a lone surrogate, a non-ASCII key) is escaped to fit.
"""
from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from expertmesh.gateway.protocol import APIError
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.proto.expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertMesh"].full_name


class UndecodableRequest:
    """Stands in for a request message that did not parse, so the call ends INVALID_ARGUMENT
    (grpcio's own answer is UNKNOWN, naming protobuf's DecodeError)."""

    def __init__(self, message_name: str, reason: str) -> None:
        self.message_name, self.reason = message_name, reason


def lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            reason = str(exc).rsplit(": ", 1)[-1]  # "Error parsing message with type 'x': <reason>"
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, reason)

    return parse


def add_servicer(servicer: pb_grpc.ExpertMeshServicer, server: grpc.aio.Server) -> None:
    """`add_ExpertMeshServicer_to_server`, with requests parsed by `lenient`."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["ExpertMesh"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=lenient(request),
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def decoded(request):
    if isinstance(request, UndecodableRequest):
        raise APIError(f"the request is not a valid {request.message_name} message: {request.reason}",
                       code="invalid_message")
    return request


def utf8_details(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (a lone surrogate quoted from a request) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def ascii_metadata(text: str) -> str:
    """Metadata values are ASCII: `param` may quote a key of the request."""
    return text.encode("ascii", "backslashreplace").decode("ascii")
