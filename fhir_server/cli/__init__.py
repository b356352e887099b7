"""``fhir-server``: the command line operators, the benchmark and conformance tools rely on.

    fhir-server run    [--host H] [--port P] [--mongo-port M] [--data DIR] [--workers N]
    fhir-server serve  [--host H] [--port P] [--workers N]        (needs MONGODB_URI)
    fhir-server mongod start --port P --dbpath DIR                (prints the URI)
    fhir-server mongod stop  --dbpath DIR
    fhir-server load PATH... [--url URL] [--concurrency N]
    fhir-server reindex [--url URL] [--param SP_URL]...
    fhir-server simulate-upstream immunization [--port P] [--seed S] [--children N]
    fhir-server sync immunization [--url URL] [--token T] [--file PAGE.xml.gz]... [--full] [--every SECONDS]
    fhir-server deadletter list|replay immunization
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import click

from fhir_server.cli.audit import audit_group
from fhir_server.cli.auth import auth_group
from fhir_server.cli.connectors import deadletter_group, simulate_upstream, sync_command
from fhir_server.cli.loader import load_command
from fhir_server.cli.reindex import reindex_command
from fhir_server.config import load_settings
from fhir_server.storage import mongod as embedded

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=_CONTEXT)
def cli() -> None:
    """FHIR R4 服务器（居民电子健康档案）— FHIR R4 server for China's regional health-information exchange."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _auth_banner(settings, url: str) -> None:  # noqa: ANN001
    """Say whether access control is on, and how to get a token."""
    if not settings.auth_enabled:
        click.secho(
            "WARNING: access control is OFF (FHIR_AUTH_ENABLED=0): anyone who reaches this port reads and changes every record.",
            fg="red", bold=True, err=True,
        )
        return
    click.echo("access control is ON: every request except /metadata needs 'Authorization: Bearer <token>'")
    if settings.auth_dev_server:
        click.echo(f"  development tokens (SMART; discovery at {url}/.well-known/smart-configuration):")
        for kind, what in (
            ("hospital", "system/ scopes, private_key_jwt client credentials; writes only its own meta.source"),
            ("clinician", "user/*.cruds"),
            ("resident", "patient/ scopes, confined to the demo resident's own record"),
            ("auditor", "user/AuditEvent.rs"),
        ):
            uri = os.environ.get("MONGODB_URI", "")
            uri = "<the server's MONGODB_URI>" if "@" in uri or not uri else uri  # no password on the screen
            env = f"MONGODB_URI='{uri}' " if kind == "hospital" else ""  # the demo hospital's key is in the database
            click.echo(f"    {env}fhir-server auth dev-token --kind {kind:<9} --url {url}   # {what}")
        click.echo(f'  e.g. curl -H "Authorization: Bearer $(fhir-server auth dev-token --kind clinician)" {url}/Patient')
    if settings.auth_external_issuers:
        click.echo(f"  trusted external issuers: {settings.auth_external_issuers}")


def _serve(host: str, port: int, workers: int, config: str | None) -> None:
    import uvicorn

    if config:
        os.environ["FHIR_SERVER_CONFIG"] = config
    from fhir_server.storage import field_crypto

    try:
        settings = load_settings()  # the workers load them again; a mistake is better said once, here
        field_crypto.from_settings(settings)  # no key while field encryption is on: refuse now
    except ValueError as e:
        raise click.ClickException(f"settings: {e}") from None
    except field_crypto.FieldCryptoError as e:
        raise click.ClickException(str(e)) from None
    if not _port_free(host, port):
        raise click.ClickException(f"port {port} on {host} is already in use (is the server already running?)")
    click.echo(f"FHIR R4 server on http://{host}:{port}/fhir  (MongoDB: {os.environ['MONGODB_URI'].split('@')[-1]})")
    _auth_banner(settings, f"http://{host}:{port}{settings.base_path}")
    uvicorn.run(
        "fhir_server.http.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=os.environ.get("FHIR_LOG_LEVEL", "warning"),
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


@cli.command(context_settings=_CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True, help="监听地址 / address to listen on")
@click.option("--port", default=8080, show_default=True, help="HTTP 端口 / HTTP port")
@click.option("--workers", default=1, show_default=True, help="工作进程数 / worker processes")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="TOML settings file")
def serve(host: str, port: int, workers: int, config: str | None) -> None:
    """Serve FHIR at /fhir using MONGODB_URI (no mongod is started)."""
    if not os.environ.get("MONGODB_URI"):
        raise click.ClickException("MONGODB_URI is not set; use `fhir-server run` for the embedded mongod")
    _serve(host, port, workers, config)


@cli.command(context_settings=_CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--mongo-port", default=27117, show_default=True, help="port of the embedded mongod")
@click.option("--data", "data_dir", default=".data/mongod", show_default=True, help="embedded mongod data folder")
@click.option("--workers", default=2, show_default=True)
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="TOML settings file")
def run(host: str, port: int, mongo_port: int, data_dir: str, workers: int, config: str | None) -> None:
    """Start the embedded mongod (unless MONGODB_URI is set) and serve FHIR; Ctrl-C stops both."""
    started = False
    dbpath = Path(data_dir)
    if not os.environ.get("MONGODB_URI"):
        _embedded_field_key(dbpath, config)
        already = embedded.running_pid(dbpath) is not None
        try:
            uri = embedded.start(mongo_port, dbpath)
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
        started = not already
        os.environ["MONGODB_URI"] = uri
        click.echo(f"embedded mongod {'reused' if already else 'started'}: {uri} (data in {dbpath})")
    try:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _serve(host, port, workers, config)
    finally:
        if started:
            embedded.stop(dbpath)
            click.echo("embedded mongod stopped")


def _embedded_field_key(dbpath: Path, config: str | None) -> None:
    """With no field key configured, the embedded mode keeps one beside its data folder (made on the
    first start, mode 600), so ID and phone numbers are encrypted from the first write."""
    from fhir_server.storage import field_crypto

    try:
        settings = load_settings(config)
    except ValueError:
        return  # _serve says what is wrong
    if not settings.field_encryption or settings.field_key or settings.field_key_file:
        return
    key_file = dbpath.parent / "field.key"
    if not key_file.exists():
        field_crypto.write_key_file(key_file)
        click.echo(f"field encryption key created: {key_file} (back it up apart from the database: without it "
                   "the stored ID and phone numbers cannot be read)")
    os.environ["FHIR_FIELD_KEY_FILE"] = str(key_file.resolve())


@cli.group(context_settings=_CONTEXT)
def mongod() -> None:
    """Manage the embedded mongod (MongoDB 6.0.5, single-node replica set)."""


@mongod.command("start", context_settings=_CONTEXT)
@click.option("--port", default=27117, show_default=True)
@click.option("--dbpath", default=".data/mongod", show_default=True)
def mongod_start(port: int, dbpath: str) -> None:
    """Start mongod (or reuse the one on DBPATH) and print its URI."""
    try:
        click.echo(embedded.start(port, Path(dbpath)))
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None


@mongod.command("stop", context_settings=_CONTEXT)
@click.option("--dbpath", default=".data/mongod", show_default=True)
def mongod_stop(dbpath: str) -> None:
    """Stop the mongod running on DBPATH."""
    click.echo("stopped" if embedded.stop(Path(dbpath)) else "not running")


cli.add_command(load_command, "load")
cli.add_command(reindex_command, "reindex")
cli.add_command(simulate_upstream, "simulate-upstream")
cli.add_command(sync_command, "sync")
cli.add_command(deadletter_group, "deadletter")
cli.add_command(auth_group, "auth")
cli.add_command(audit_group, "audit")


def main() -> None:
    cli()
