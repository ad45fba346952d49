"""OpenTelemetry: one CLIENT span per decision, exported as the OTEL_* variables say."""
