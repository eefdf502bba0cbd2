"""Protocol package `expertmesh.*` (the folder layout follows the proto package names)."""
