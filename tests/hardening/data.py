"""Data shared by the hardening tests and fuzz/ (kept free of heavy imports)."""

# The shipped istio-remote policy's shape: reads of discovery resources, one pinned ConfigMap,
# API discovery; plus one dangerous grant for cluster-b only (exec), so upgrade paths are reachable.
POLICY = """\
apiVersion: apiproxy/v1
kind: AccessPolicy
rules:
- name: discovery
  peers: ["*"]
  apiGroups: ["", discovery.k8s.io]
  resources: [pods, endpoints, services, namespaces, nodes, endpointslices]
  verbs: [get, list, watch]
- name: mesh-config
  peers: ["*"]
  apiGroups: [""]
  resources: [configmaps]
  namespaces: [istio-system]
  resourceNames: [istio]
  verbs: [get, list, watch]
- name: api-discovery
  peers: ["*"]
  nonResourceURLs: [/version, /api, /api/*, /apis, /apis/*]
  verbs: [get]
- name: b-exec
  peers: [cluster-b]
  apiGroups: [""]
  resources: [pods/exec]
  namespaces: [debug]
  verbs: [get, create]
  dangerous: true
"""
