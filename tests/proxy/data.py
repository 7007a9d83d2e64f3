"""Data shared by the proxy tests and bench/ (kept free of heavy imports)."""

# Reads of the discovery resources an istiod watches, and API discovery: what the proxy tests
# and every bench (`bench.harness.BenchFiles`) run the proxy under.
POLICY = """\
apiVersion: apiproxy/v1
kind: AccessPolicy
rules:
- name: discovery
  peers: ["*"]
  apiGroups: ["", discovery.k8s.io]
  resources: [pods, endpoints, services, namespaces, nodes, endpointslices]
  verbs: [get, list, watch]
- name: version
  peers: ["*"]
  nonResourceURLs: [/version, /api, /api/*, /apis, /apis/*]
  verbs: [get]
"""
