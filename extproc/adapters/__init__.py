"""The adapters: Envoy's gRPC services (ext_proc, ext_authz, access log), the admin server.

Rule: an adapter translates protobuf or HTTP into calls on the runtime (``extproc.state``)
and back; it holds no rule of its own about budgets, limits or routing.
"""
