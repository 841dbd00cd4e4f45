"""uvicorn's server with a graceful drain."""

from __future__ import annotations

import threading

import uvicorn


class DrainingServer(uvicorn.Server):
    """On SIGTERM / SIGINT: turn ``/ready`` to 503 and refuse new generations at once, keep
    serving for ``notice`` seconds (so load balancers see the readiness change), then let
    uvicorn stop accepting and finish in-flight requests within its graceful-shutdown time.
    """

    def __init__(self, config: uvicorn.Config, app, notice: float = 0.0):
        super().__init__(config)
        self._app, self._notice, self._exiting = app, notice, False

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self._app.state, "server", None)
        if state is not None:
            state.engine.drain()
        if self._exiting or not self._notice:
            return super().handle_exit(sig, frame)
        self._exiting = True
        # uvicorn's own handler only sets flags its main loop polls, so a timer thread may call it.
        threading.Timer(self._notice, super().handle_exit, (sig, frame)).start()
