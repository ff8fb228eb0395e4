"""What every use case works with: the installation's settings, where secrets come from,
the clock, the store, and the one road out (`Outbox`). The command line, the preview and
`serve` make one and hand it to the use cases; tests and the demo make theirs with a
transport, a store or a clock of their own."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qant_mail.audience import tokens
from qant_mail.authoring.render import Renderer
from qant_mail.base.config import Settings, find_config, load_settings
from qant_mail.store.db import Db, StoreTarget, open_store, pooled

if TYPE_CHECKING:
    # Imported when a message is to leave: `check`, `render` and the preview start
    # sooner without the send side (the ledger, the transports).
    from qant_mail.delivery.outbox import Outbox
    from qant_mail.delivery.transport import Transport


class Context:
    """One installation, as a use case sees it."""

    def __init__(
        self,
        settings: Settings,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        transport: Transport | None = None,
        store: StoreTarget | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.env = os.environ if env is None else env
        self.clock = clock
        self.transport = transport
        self.store = store if store is not None else settings.store_path
        self._secret = secret

    @classmethod
    def load(cls, config: Path | None = None, *, env: Mapping[str, str] | None = None) -> Context:
        """Return the context of the settings file `config` (default: `qant.toml` here or
        in a parent folder, or `$QANT_CONFIG`)."""
        path = config or find_config(env=env)
        return cls(load_settings(path, env), env=env)

    def secret(self) -> bytes:
        """Return the secret that signs readers' links (raise ConfigError if unset)."""
        if self._secret is None:
            self._secret = tokens.secret_from_env(self.env)
        return self._secret

    @functools.cached_property
    def outbox(self) -> Outbox:
        """Return the one road out of this installation."""
        from qant_mail.delivery.outbox import Outbox

        return Outbox(
            self.settings,
            transport=self.transport,
            store=self.store,
            env=self.env,
            clock=self.clock,
        )

    @functools.cached_property
    def renderer(self) -> Renderer:
        """Return the renderer of the main newsletter (`for_newsletter` gives the others)."""
        return Renderer(self.settings)

    def pooled(self, size: int = 10) -> contextlib.AbstractContextManager[None]:
        """Keep a pool of connections to the store while this lasts (a long-lived
        process: `serve`): each step of a use case takes one and gives it back."""
        return pooled(self.store, size)

    @contextlib.contextmanager
    def db(self) -> Iterator[Db]:
        """Open the store for one step of a use case, closed however that ends."""
        db = open_store(self.store)
        try:
            yield db
        finally:
            db.close()
