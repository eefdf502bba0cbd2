"""Server-side tools: the registry of MCP servers and webhooks, the MCP client, webhook signing,
the network guard for request-supplied URLs, and `ToolRunner`, which the Responses API calls
(DESIGN.md, "Server-side tools")."""
