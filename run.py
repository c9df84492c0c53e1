#!/usr/bin/env python
"""Run a gaitflow pipeline.

    python run.py --settings settings.toml             run until stopped (Ctrl-C drains)
    python run.py --settings settings.toml --check     validate settings and wiring (exit 0/1)
    python run.py --settings settings.toml --graph     print the graph as text and Mermaid
    python run.py --set handlers.mqtt.port=1884 ...    override any key
    python run.py --list | --describe TYPE             handler types and their settings
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
