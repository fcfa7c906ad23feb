"""The Envoy side: rendering the Envoy config for a policy and checking it with Envoy."""
