"""``ultraflux worker start``: the process-pool worker that stops without claiming new flow runs."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run a Prefect process worker that drains on SIGTERM.", no_args_is_help=True)


@app.command("start")
def start(
    pool: str = typer.Option(..., "--pool", "-p", metavar="NAME",
                             help="work pool of type process (e.g. ultraflux-process)"),
    name: str | None = typer.Option(None, metavar="NAME", help="worker name (default: Prefect's generated one)"),
    limit: int = typer.Option(4, min=1, help="flow runs at once; also what a stop waits for"),
    with_healthcheck: bool = typer.Option(
        False, help="serve Prefect's worker /health (PREFECT_WORKER_WEBSERVER_PORT)"),
) -> None:
    """Prefect's process worker; the first SIGTERM/SIGINT makes it claim no new flow run and exit when the runs it
    has claimed end (Prefect's own worker goes on claiming); a second one stops it at once."""
    import asyncio

    from ultraflux.worker import serve

    asyncio.run(serve(pool, name=name, limit=limit, with_healthcheck=with_healthcheck, printer=typer.echo))
