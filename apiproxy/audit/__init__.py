"""Audit: audit.k8s.io/v1 events, the bounded async writer, and the `apiproxy audit` review tools.

The proxy uses `make_event` (apiproxy.audit.events) and `AuditWriter` (apiproxy.audit.writer);
operators use `apiproxy audit summarize|suggest` (apiproxy.audit.cli). See docs/audit.md.
"""

from apiproxy.audit.events import make_event, object_ref, object_ref_from_info
from apiproxy.audit.writer import AuditWriter

__all__ = ["AuditWriter", "make_event", "object_ref", "object_ref_from_info"]
