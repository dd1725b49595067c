"""Text clean-up shared by the sources: HTML to text, RST markup, Gutenberg boilerplate, paragraphs."""
from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "pre", "table", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
               "dt", "dd", "dl", "blockquote", "section", "hr", "title"}
_SKIP_TAGS = {"script", "style", "head"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        if tag == "pre":
            self.pre_depth += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS and self.skip_depth:
            self.skip_depth -= 1
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        # HTML collapses whitespace outside <pre>; keep code blocks as written.
        self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return normalize_paragraphs("".join(parser.parts))


_RST_DIRECTIVE = re.compile(r"^\s*\.\. [\w:-]+::.*$")  # ".. note::", ".. function:: f(x)"
_RST_OPTION = re.compile(r"^\s+:[\w -]+:.*$")  # directive options such as "   :noindex:"
_RST_ROLE = re.compile(r":[\w:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~os.path.join` -> os.path.join
_RST_COMMENT = re.compile(r"^\.\.(\s.*)?$")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.])\1{3,}\s*$")


def strip_rst(text: str) -> str:
    """Drop directives, options, comments and heading underlines; keep role text. Body text stays."""
    lines = []
    in_directive_head = False  # indented lines glued to a directive (".. index::" entries) are markup too
    for line in text.splitlines():
        if _RST_DIRECTIVE.match(line) or _RST_UNDERLINE.match(line) or _RST_COMMENT.match(line):
            in_directive_head = True
            continue
        if in_directive_head and line.startswith((" ", "\t")) and line.strip():
            continue
        in_directive_head = False
        if _RST_OPTION.match(line) and (not lines or not lines[-1].strip() or _RST_OPTION.match(lines[-1])):
            continue
        lines.append(_RST_ROLE.sub(r"\1", line).replace("``", ""))
    return normalize_paragraphs("\n".join(lines))


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Keep only the text between the Gutenberg START and END markers when they are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return normalize_paragraphs(text)


def normalize_paragraphs(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def chunk_document(text: str, max_chars: int) -> list[str]:
    """Cut a long document at paragraph boundaries into parts of at most ~max_chars.

    Whole manuals and plays are too coarse for document-level splits; their sections are the natural unit.
    A single paragraph longer than max_chars stays whole (never cut mid-paragraph)."""
    if len(text) <= max_chars:
        return [text]
    parts, current, size = [], [], 0
    for para in paragraphs(text):
        if current and size + len(para) + 2 > max_chars:
            parts.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        parts.append("\n\n".join(current))
    return parts
