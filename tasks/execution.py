"""
Run a model's Python program and its tests in a sandbox: a fresh interpreter in a new temporary directory,
killed (with anything it started) after a wall-clock timeout, with limits on memory (RLIMIT_AS), CPU time,
the size of any file it writes and (for users other than root) processes. Before the program runs, an audit
hook, which Python code cannot remove, refuses sockets, new processes, ctypes, changing the limits, and
writing, renaming or deleting anything outside the directory. It stops accidents and the usual ways a
generated program goes wrong, not code written to escape it (no kernel isolation).
"""
import os
import secrets
import signal
import subprocess
import sys
import tempfile

GUARD = r'''
import os, resource, sys

def guard(limits, home):
    for kind, value in limits:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):  # e.g. a hard limit already below it
            pass
    refused = ('os.system', 'os.fork', 'os.forkpty', 'os.exec', 'os.posix_spawn', 'os.spawn', 'os.kill', 'os.killpg',
               'subprocess.Popen', 'resource.setrlimit', 'resource.prlimit', 'os.chroot')
    paths = ('os.remove', 'os.rename', 'os.rmdir', 'os.mkdir', 'os.symlink', 'os.link', 'os.chmod', 'os.chown',
             'os.truncate', 'os.utime', 'shutil.rmtree', 'shutil.copyfile', 'shutil.move')
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep

    def inside(path):
        if isinstance(path, int):  # a file descriptor it already holds
            return True
        p = realpath(fsdecode(path))
        return p == home or p.startswith(home + sep)

    def hook(event, args):
        if event == 'import' and args[0] in ('_posixsubprocess', 'ctypes', '_ctypes'):
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")  # an ImportError: optional uses go on
        if event in refused or event.startswith(('socket.', 'ctypes.')):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == 'open' and args[0] is not None:
            mode, flags = args[1] or '', args[2] or 0
            if (any(c in mode for c in 'wax+') or flags & writing) and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
        elif event in paths and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")
    sys.addaudithook(hook)

nonce = sys.stdin.readline().strip()
sys.stdin.close()
with open('program.py') as f:
    source = f.read()
guard(LIMITS, os.path.realpath(os.getcwd()))
exec(compile(source, 'program.py', 'exec'), {'__name__': '__main__'})
print(nonce, flush=True)
'''


def run_python(program, timeout=10.0, memory_mb=1024, output_mb=10):
    """Run `program` (Python source) in the sandbox. Returns (passed, why): passed when it ran to its end and
    exited 0 within timeout seconds (an exit part-way, even with status 0, fails); why says what went wrong."""
    import resource
    nonce = secrets.token_hex(16)  # printed after the program's end: an early exit cannot print it
    limits = [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, int(timeout) + 1),
              (resource.RLIMIT_FSIZE, output_mb << 20), (resource.RLIMIT_NPROC, 0)]
    with tempfile.TemporaryDirectory(prefix='sandbox-', ignore_cleanup_errors=True) as home:
        with open(os.path.join(home, 'program.py'), 'w') as f:
            f.write(program)
        with open(os.path.join(home, 'output.txt'), 'w+b') as out:
            proc = subprocess.Popen([sys.executable, '-I', '-B', '-c', GUARD.replace('LIMITS', repr(limits))],
                                    cwd=home, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    env={'PATH': '/usr/bin:/bin', 'OMP_NUM_THREADS': '1'}, start_new_session=True)
            try:
                proc.communicate(nonce.encode() + b'\n', timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole session: whatever it started goes with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            out.seek(max(0, os.fstat(out.fileno()).st_size - 4096))
            tail = out.read().decode('utf-8', errors='replace').strip()
    if timed_out:
        return False, f"timed out after {timeout:g} s"
    if proc.returncode == 0 and tail.endswith(nonce):
        return True, ''
    if proc.returncode < 0:
        return False, f"killed by {signal.Signals(-proc.returncode).name}"
    last = tail.splitlines()[-1] if tail else f"exit status {proc.returncode}"
    return False, last if proc.returncode else f"exited before its end ({last})"
