"""`review list|show|approve|edit|reject` and `serve` (the review web app)."""

from __future__ import annotations

import typer

from agent.cli.common import JsonOpt, not_available

review_app = typer.Typer(help="Review the drafts of escalated emails.", no_args_is_help=True)


def _stub(name: str):
    def cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
        not_available(f"review {name}", "review capability, issue 7")
    cmd.__doc__ = f"{name.capitalize()} escalated drafts."
    return cmd


for _name in ("list", "show", "approve", "edit", "reject"):
    review_app.command(_name)(_stub(_name))


def serve(ctx: typer.Context) -> None:
    """Serve the review web app (bound to 127.0.0.1 by default)."""
    not_available("serve", "review capability, issue 7")


def register(app: typer.Typer) -> None:
    app.add_typer(review_app, name="review")
    app.command("serve")(serve)
