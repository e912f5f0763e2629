"""The README's install commands: the lines of the bash block of its "Install" section."""

from __future__ import annotations

import re


def install_commands(readme: str) -> list[str]:
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


if __name__ == "__main__":
    import sys

    print("\n".join(install_commands(open(sys.argv[1]).read())))
