"""The cluster's TLS: certificates (pki), their files (files) and SSL contexts (contexts)."""
