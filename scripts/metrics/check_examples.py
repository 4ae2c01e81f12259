#!/usr/bin/env python3
"""Checks that the monitoring examples only query series chatgate exports: every
`chatgate_*` / `process_*` metric named in the files exists in a real /metrics scrape,
every label a selector filters on (`name{label=...}`) is one that metric carries, and
every label an aggregation keeps (`by (label)`) is carried by a metric of the same
expression.
Prometheus's own labels (instance, job) are allowed everywhere.

    check_examples.py SCRAPE.txt FILE...
"""
import json
import re
import sys

import yaml

NAME = r"(?:chatgate|process)_[a-zA-Z0-9_]+"
ADDED_BY_PROMETHEUS = {"instance", "job"}


def exported(scrape):
    """Metric name -> the label names its samples carry."""
    series = {}
    for line in scrape.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s", line)
        if not match:
            continue
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', match.group(2) or ""))
        series.setdefault(match.group(1), set()).update(labels)
    return series


def expressions(path):
    """The PromQL expressions of a Grafana dashboard (JSON) or a rules file (YAML)."""
    with open(path) as file:
        document = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    if not found:
        sys.exit(f"{path}: no expressions found")
    return found


def main():
    series = exported(open(sys.argv[1]).read())
    problems = []
    for path in sys.argv[2:]:
        for text in expressions(path):
            problems += check(path, text, series)
    for problem in sorted(set(problems)):
        print(problem)
    if problems:
        sys.exit(1)
    print(f"monitoring examples: every series and label they use is in the scrape ({len(series)} series names)")


def check(path, text, series):
    problems = []
    carried = set(ADDED_BY_PROMETHEUS)
    for name in re.findall(NAME, text):
        carried |= series.get(name, set())
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text):
        for label in filter(None, (label.strip() for label in group.split(","))):
            if label not in carried:
                problems.append(f"{path}: {text.strip()!r} groups by {label!r}, which none of its series carries")
    for match in re.finditer(rf"({NAME})(\{{[^}}]*\}})?", text):
        name, selector = match.group(1), match.group(2) or ""
        if name not in series:
            problems.append(f"{path}: {name} is not in the scrape")
            continue
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector):
            if label not in series[name] | ADDED_BY_PROMETHEUS:
                problems.append(f"{path}: {name} has no label {label!r}")
    return problems


if __name__ == "__main__":
    main()
