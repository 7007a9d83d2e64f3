"""`apiproxy federate`: metadata exporter and federation controller.

Two clusters with separate Istio roots become one mesh once an operator creates an
`IstioMulticluster` object on each side pointing at the other. See docs/federation.md.
The factory is :class:`apiproxy.federation.main.Federation`.
"""
