# Runs VolumeDriver for the torture test: writes the small-SCO configuration, starts `vd serve` (log appended to one
# file, readiness polled from the log), stops it with SIGKILL or SIGTERM, and runs `vd` CLI commands with timeouts.

import os
import signal
import subprocess
import time

CONFIG = """\
# Written by tools/torture: small SCOs and short timers so sealing, uploads and scrub results happen often.
data_dir = "{data}"
log_level = "info"

[sco]
size = "1M"

[upload]
max_age_seconds = 1
max_pending = "64M"
retry_delay_seconds = 0.1
retry_delay_max_seconds = 1

[cache]
size = "256M"

[scrub]
poll_seconds = 1
delete_grace_seconds = 1

[shutdown]
drain_timeout_seconds = 120
"""


class VDFailure(Exception):
    """VolumeDriver did something it must not (a command failed, the router died or did not stop cleanly)."""


def wait_until(condition, timeout, what, interval=0.02):
    """Polls `condition` until it returns something true; raises VDFailure naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise VDFailure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class VD:
    def __init__(self, binary, work):
        self.binary = binary
        self.data = os.path.join(work, "data")
        self.config = os.path.join(work, "vd.toml")
        self.log_path = os.path.join(work, "serve.log")
        self.socket = os.path.join(self.data, "nbd.sock")
        self.process = None
        self.starts = 0
        os.makedirs(self.data, exist_ok=True)
        with open(self.config, "w") as f:
            f.write(CONFIG.format(data=self.data))

    # ---- the CLI

    def command(self, *args):
        return [self.binary, *args, "--config", self.config]

    def run(self, *args, timeout=180, check=True):
        """Runs `vd ARGS`; with check, a non-zero exit is a VDFailure quoting its output."""
        try:
            result = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VDFailure(f"`vd {' '.join(args)}` did not finish within {timeout} s")
        if check and result.returncode != 0:
            raise VDFailure(
                f"`vd {' '.join(args)}` exited {result.returncode}: {(result.stderr + result.stdout).strip()}")
        return result

    def spawn(self, *args):
        """Starts `vd ARGS` in the background (stdout and stderr captured)."""
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # ---- the router

    def note(self, text):
        """A marker line in the serve log, so the log can be matched with the trace."""
        with open(self.log_path, "a") as log:
            log.write(f"==== torture: {text}\n")

    def start(self, why):
        if self.process is not None:
            raise AssertionError("vd serve is already running")
        self.starts += 1
        self.note(f"start #{self.starts} ({why})")
        offset = os.path.getsize(self.log_path)
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [self.binary, "serve", "--config", self.config, "--nbd-socket", self.socket],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

        def ready():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise VDFailure(f"vd serve exited {code} while starting (see {self.log_path})")
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return b"\nready (" in f.read() and os.path.exists(self.socket)

        wait_until(ready, 120, "vd serve to print 'ready'")

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def check_alive(self):
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            self.process = None
            raise VDFailure(f"vd serve died on its own (exit status {code}); see {self.log_path}")

    def kill9(self):
        self.check_alive()
        self.note("SIGKILL")
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def terminate(self, timeout=180):
        """SIGTERM: the router must drain everything to the backend and exit 0."""
        self.check_alive()
        self.note("SIGTERM")
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.process = None
            raise VDFailure(f"vd serve did not exit within {timeout} s of SIGTERM")
        self.process = None
        if code != 0:
            raise VDFailure(f"vd serve exited {code} after SIGTERM (a clean drain must exit 0); see {self.log_path}")

    def stop_quietly(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
