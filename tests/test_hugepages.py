"""Huge pages for the weights: `import llamaforge` before torch gets them; torch first gets one line saying how."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llamaforge import hugepages

pytestmark = pytest.mark.skipif(not hugepages.available(), reason="this kernel gives no transparent huge pages "
                                "(/sys/kernel/mm/transparent_hugepage/enabled is absent or [never])")

# Prints the huge-page kilobytes of the mapping that holds a fresh 64 MB tensor, then loads the demo model.
PROBE = textwrap.dedent("""
    import sys
    {imports}
    from llamaforge import hugepages
    x = torch.ones(64 << 20, dtype=torch.uint8)
    address, huge = x.data_ptr(), None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                start, end = (int(part, 16) for part in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "AnonHugePages:":
                huge = int(fields[1])
    print(huge, hugepages.in_effect())
    llamaforge.load()
""")


def run_probe(imports: str) -> tuple[int, bool, str]:
    """(huge-page kB under the tensor, in_effect(), stderr) of PROBE in a fresh Python with these imports."""
    env = {key: value for key, value in os.environ.items() if key != hugepages.VARIABLE}
    done = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    huge, effect = done.stdout.split()
    return int(huge), effect == "True", done.stderr


def test_llamaforge_imported_first_puts_large_tensors_on_huge_pages_silently():
    huge, effect, stderr = run_probe("import llamaforge\nimport torch")
    assert effect and huge >= 32 << 10, f"{huge} kB of the 64 MB tensor on huge pages"
    assert hugepages.VARIABLE not in stderr


def test_torch_imported_first_gets_one_line_on_how_to_have_them():
    _, effect, stderr = run_probe("import torch\nimport llamaforge")
    assert not effect
    assert stderr.count(hugepages.VARIABLE) == 1 and "import llamaforge first" in stderr
