"""Key commands: ``keygen``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    _console,
    app,
    fail,
)

# -- keys ---------------------------------------------------------------------------------


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", help="Folder for the key files.")],
    name: Annotated[
        str, typer.Option("--name", help="File stem: NAME.key (private), NAME.pub (public).")
    ] = "signing",
) -> None:
    """Create an Ed25519 key pair for signing plugins (private key mode 0600)."""
    from ..trust import TrustError, generate_keypair, load_public_keys

    try:
        private_path, public_path = generate_keypair(out, name)
        kid = next(iter(load_public_keys(public_path)))
    except TrustError as exc:
        raise fail(str(exc), "pick another --out or --name") from None
    _console.print(f"key id      {kid}")
    _console.print(f"private key {private_path}  (mode 0600: keep it secret, off the hosts)")
    _console.print(f"public key  {public_path}")
    _console.print(
        f"Copy only {public_path.name} to the hosts (`plugin-host run --trusted-keys "
        f"{public_path.name}`); publish with `plugin-host push --sign-key {private_path}`."
    )
