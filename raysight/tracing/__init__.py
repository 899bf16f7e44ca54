"""The user's contexts: ``model.trace`` (Tracer, Invoker) and the control helpers that build graphs."""
