"""Pages from Jinja2 templates (mmfm/report/templates), autoescaped."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape


def render_page(template: str, **context: Any) -> str:
    env = Environment(loader=PackageLoader("mmfm.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    return env.get_template(template).render(**context)
