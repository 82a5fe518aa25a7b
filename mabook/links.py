"""Every local link and anchor of the built book, checked offline (`check_links`): what
``python -m mabook.book build`` and ``links`` fail on."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Attributes that point at another file of the site.
LINK_ATTRIBUTES = {"a": "href", "link": "href", "img": "src", "script": "src", "iframe": "src", "source": "src"}
# Folders of the site that are third-party files (plotly.js, MathJax, the theme), not pages.
LINK_SKIP_DIRS = ("_static",)


class _LinkParser(HTMLParser):
    """The ids (anchors) a page defines and the local links it makes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(name):
                self.ids.add(attrs[name])
        target = attrs.get(LINK_ATTRIBUTES.get(tag, ""))
        if target and not (tag == "link" and attrs.get("rel") in ("preconnect", "dns-prefetch")):
            self.links.append(target.strip())


def _is_external(link: str) -> bool:
    return bool(urlsplit(link).scheme) or link.startswith("//")


def check_links(html_dir: Path) -> list[str]:
    """Every local link of the site in `html_dir` that points nowhere: ``"page -> link: why"``.

    A link is local when it has no scheme (``https:``, ``mailto:``, ``data:``, ...) and is not
    protocol-relative. Its file must exist (a folder means its ``index.html``) and, if it has a
    ``#fragment``, the target page must define that id (``id=`` on any element, ``name=`` on ``<a>``).
    Pages under ``_static`` (third-party files) are not read. Offline: nothing is fetched.
    """
    html_dir = Path(html_dir).resolve()
    pages = sorted(p for p in html_dir.rglob("*.html")
                   if not any(part in LINK_SKIP_DIRS for part in p.relative_to(html_dir).parts[:-1]))
    parsed: dict[Path, _LinkParser] = {}

    def parse(path: Path) -> _LinkParser:
        if path not in parsed:
            parser = _LinkParser()
            parser.feed(path.read_text(encoding="utf-8", errors="replace"))
            parser.close()
            parsed[path] = parser
        return parsed[path]

    broken = []
    for page in pages:
        name = page.relative_to(html_dir).as_posix()
        for link in parse(page).links:
            if _is_external(link) or link in ("#", ""):
                continue
            url = urlsplit(link)
            path = unquote(url.path)
            if not path:
                target = page
            elif path.startswith("/"):
                target = html_dir / path.lstrip("/")
            else:
                target = page.parent / path
            target = Path(os.path.normpath(target))
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{name} -> {link}: no such file")
                continue
            fragment = unquote(url.fragment)
            if fragment and target.suffix == ".html" and fragment not in parse(target).ids:
                broken.append(f"{name} -> {link}: no id {fragment!r} in {target.relative_to(html_dir).as_posix()}"
                              if target.is_relative_to(html_dir) else f"{name} -> {link}: no id {fragment!r}")
    return broken
