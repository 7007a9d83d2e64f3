"""apiproxy's development tools: the simulated kube-apiserver (`apiproxy_dev.sim`) and the
two-cluster demo (`apiproxy_dev.demo`). Installed from a checkout (`pip install -e ./dev`), never
in the production wheel or image; `apiproxy sim` and `apiproxy demo` dispatch here."""
