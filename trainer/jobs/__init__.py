"""The persistent queue, its journal, the pre-checks and the REST API."""
