"""Plain-text tables for the programs and the benchmarks (no dependency beyond the standard library)."""

from __future__ import annotations


def format_table(rows: list, columns: list) -> str:
    """Fixed-width text table: ``columns`` are (header, key) pairs, ``rows`` dicts (None shows as "-")."""
    header = [h for h, _ in columns]
    body = [["-" if r.get(k) is None else str(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
