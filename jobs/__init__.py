"""Service layer shared by the API and the worker: job requests, job store, artifact stores, queue."""
