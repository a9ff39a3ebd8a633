"""The API with the `kill_api` fault (`uvicorn tests.faults.api_hooks:app`); test-only.

It wraps the app's job store so that creating a job whose model source matches a `kill_api` entry of
the plan SIGKILLs this process right after the record (and its outbox entry) is written, before
`jobs.lifecycle.submit` sends the task. Production serves `api.app:app`, which never imports this.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from fastapi import FastAPI

from api.app import create_app
from jobs import logs
from tests.faults.plan import fault_for


def _with_kill_after_create(application: FastAPI) -> FastAPI:
    store = application.state.services.store
    create = store.create

    def create_then_maybe_die(tenant: str, request: Any, *args: Any, **kwargs: Any) -> Any:
        job, created = create(tenant, request, *args, **kwargs)
        fault = fault_for(request.model.source, 1)
        if created and fault is not None and fault.get("action") == "kill_api":
            os.kill(os.getpid(), signal.SIGKILL)
        return job, created

    store.create = create_then_maybe_die
    return application


def __getattr__(name: str) -> FastAPI:
    """`tests.faults.api_hooks:app` builds the app from the environment on first access."""
    if name == "app":
        logs.configure("api")
        globals()["app"] = application = _with_kill_after_create(create_app())
        return application
    raise AttributeError(name)
