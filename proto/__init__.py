"""The gRPC API's `.proto` files (`expertmesh/v1/`) and the Python stubs generated from them.

    from expertmesh.proto.expertmesh.v1 import expertmesh_pb2, expertmesh_pb2_grpc

Regenerate the stubs after editing a `.proto` with `python -m expertmesh.proto.generate`;
`tests/test_grpc.py::test_stubs_are_fresh` fails while they are stale.
"""
