"""Proto package `expertmesh.v1`: `expertmesh.proto` and its generated stubs (do not edit those)."""
