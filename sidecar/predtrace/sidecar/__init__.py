"""predtrace's sidecar: the event pipeline and the process that hosts it.

``predtrace.sidecar.pipeline`` is the pipeline core (also used in-process by
the middleware); the gRPC server, spool and receivers load only when the
sidecar runs.
"""
