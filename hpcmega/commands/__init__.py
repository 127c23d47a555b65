"""Click commands, one module per command family. Each imports only click and pure modules at import time."""
