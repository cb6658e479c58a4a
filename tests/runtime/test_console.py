"""console.keep_going: a process whose stdout and stderr readers have gone carries on."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

CHILD = """
import sys
if sys.argv[1] == "guarded":
    from dsfm.runtime.console import keep_going
    keep_going()
sys.stdin.readline()                    # the readers are gone by now
print("a line for nobody", flush=True)
sys.stderr.write("and another\\n")
sys.stderr.flush()
print("x" * 100000)                     # more than the pipe holds: written to /dev/null
with open(sys.argv[2], "w") as fh:
    fh.write("went on")
"""


@pytest.mark.parametrize("guarded", [True, False])
def test_writes_after_the_reader_has_gone_go_nowhere_and_the_process_goes_on(tmp_path,
                                                                              guarded):
    """The rank under pdsh whose ssh session ended: guarded, it finishes its work (exit 0,
    the file written); unguarded (the control), it dies of the broken pipe."""
    done = tmp_path / "done"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "guarded" if guarded else "bare",
                             str(done)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    proc.stderr.close()
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    rc = proc.wait(timeout=60)
    if guarded:
        assert rc == 0 and done.read_text() == "went on"
    else:
        assert rc != 0 and not done.exists()
