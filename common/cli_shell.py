"""What the relay's and the client's command lines share: the service commands (start, stop,
logs, the internal _supervise), the refusal to start a second copy, the worker's command line,
running in the foreground (logging, SIGTERM, the worker record), and the one way out of a
command (an error line, or a quiet exit when the output pipe closes).

Each CLI describes itself once as a ``Program`` and keeps only its own options and commands.
This is application shell rather than wire format; it lives in ``common`` because both programs
use it and the layout has no other shared package.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from . import config, logsafe, service, startcheck, systemunit
from .autostart import install_autostart, remove_autostart
from .errors import ChuantouError
from .supervisor import follow_log, read_log_tail, start_background, stop_background, supervise
from .threads import tune_for_many_threads


def local_opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """An opener for a command talking to its own program on loopback: never through the user's
    http_proxy. ``handlers`` (HTTPS with a context) are added to it."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)


LOCAL_OPENER = local_opener()


class ForegroundApp(Protocol):
    """What ``Program.run_foreground`` runs: ServerApp and ClientApp."""

    @property
    def log_level(self) -> str: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...

    def worker_facts(self) -> dict: ...


App = TypeVar("App", bound=ForegroundApp)


@dataclass(frozen=True)
class Program:
    """One of the two programs as its service commands see it."""

    role: str  # "server" or "client": names its state files and appears in messages
    module: str  # python -m <module>
    describe_running: Callable[[int, dict], str]  # (pid, worker facts) -> "chuantou ... is already running (...)"
    given_options: Callable[[argparse.Namespace], dict]  # startopts: the run options typed
    option_defaults: dict  # startopts: what an unset option means, in words
    worker_options: tuple[str, ...]  # run options (argparse dests) the worker is started with
    path_options: frozenset[str] = frozenset({"config"})  # made absolute: the worker may run elsewhere (at boot)
    worker_flags: tuple[str, ...] = ()
    boot_facts: tuple[tuple[str, str], ...] = ()  # (--option, worker fact) named at boot when not given

    def files(self, args) -> service.ServiceFiles:
        return service.ServiceFiles.for_role(self.role, getattr(args, "config", None))

    def worker_args(self, args) -> list[str]:
        """The foreground command line equivalent to ``args``' run options; never a token, which
        is saved in the config file rather than shown in ``ps``."""
        out = []
        for option in self.worker_options:
            value = getattr(args, option, None)
            if value is not None:
                if option in self.path_options:
                    value = os.path.abspath(value)
                out += [f"--{option.replace('_', '-')}", str(value)]
        for flag in self.worker_flags:
            if getattr(args, flag, None):
                out.append(f"--{flag.replace('_', '-')}")
        return out

    def refuse_if_running(self, args, command: str) -> str | None:
        """None if no instance runs with this config; else the "already running" line when it uses
        every option given, or OptionsNotApplied naming those it does not use and how to apply them."""
        return startcheck.refuse_if_running(
            self.files(args), self.module, getattr(args, "config", None), command, self.given_options(args),
            self.describe_running, self.option_defaults)

    def install_autostart(self, args, worker: dict | None) -> None:
        """Start at boot with the worker's options, and what ``boot_facts`` names from ``worker``
        when not given (at boot, the environment the user started it from is gone)."""
        boot_args = self.worker_args(args)
        for option, fact in self.boot_facts:
            if option not in boot_args and worker and worker.get(fact):
                boot_args += [option, str(worker[fact])]
        install_autostart_or_warn(self.files(args), self.module, boot_args)

    # --- the commands -----------------------------------------------------------------------

    def start(self, args, launch: Callable[[service.ServiceFiles], dict]) -> int:
        """``start``: ``launch(files)`` validates, starts the background instance, says how it
        went and returns its worker facts; unless one runs already with these options."""
        svc = self.files(args)
        if service.already_running(svc):
            print(self.refuse_if_running(args, "start"))
            if args.autostart:  # the one start option that can be applied to a running instance
                self.install_autostart(args, service.running_worker(svc))
            return 0
        worker = launch(svc)
        print(f"log: {svc.log_file}")
        if args.autostart:
            self.install_autostart(args, worker)
        return 0

    def start_background(self, svc: service.ServiceFiles, args) -> dict:
        return start_background(svc, self.module, self.worker_args(args))

    def stop(self, args) -> int:
        return stop_command(self.files(args), args.keep_autostart)

    def logs(self, args) -> int:
        return logs_command(self.files(args), args.lines, args.follow)

    def supervise(self, args) -> int:
        worker = [a for a in args.worker_args if a != "--"]
        return supervise(service.files_for_worker(self.role, worker), self.module, worker)

    def run_foreground(self, args, make_app: Callable[[argparse.Namespace], App],
                       announce: Callable[[App, threading.Event], None]) -> int:
        """Run in this process until SIGTERM or Ctrl-C, announced in the worker record.
        ``announce(app, stop)`` prints what the user needs once the app has started."""
        running = self.refuse_if_running(args, "command")  # before make_app, which may save options
        if running:  # a second copy would fight the first for its ports (and the client for its ID)
            raise ChuantouError(f"{running}; stop it first: python -m {self.module} stop")
        app = make_app(args)
        setup_logging(app.log_level)
        tune_for_many_threads()  # modest stacks, a GIL switch interval that does not convoy
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        app.start()
        try:
            with service.WorkerRecord(self.files(args), app.worker_facts()):
                announce(app, stop)
                while not stop.wait(1.0):
                    pass
        except KeyboardInterrupt:
            pass
        finally:
            app.stop()
        return 0

    def system_service(self, args) -> systemunit.SystemService:
        return systemunit.SystemService(self.role, self.module, user=args.user, root=Path(args.root))

    def install_service(self, args, prepare: Callable[[argparse.Namespace, Path], None]) -> int:
        """``install-service [--print] [--user NAME]``: the system unit running the foreground
        program with these run options; ``prepare(args, config_path)`` writes the service's config
        (as ``start`` does in the user's terminal: the relay's token is made and shown here)."""
        if getattr(args, "config", None):
            raise config.ConfigError(f"the service keeps its config in {systemunit.STATE_DIR}: install without "
                                     f"--config, then edit that file or give the options here")
        svc = self.system_service(args)
        text = systemunit.unit_text(svc, self.worker_args(args))
        if args.print:
            print(text, end="")
            return 0
        systemunit.require_root(svc, "install-service")
        done = systemunit.ensure_user(svc)
        svc.under_root(systemunit.STATE_DIR).mkdir(mode=0o750, parents=True, exist_ok=True)
        prepare(args, svc.under_root(svc.config_path))
        systemunit.hand_state_to_user(svc)
        for line in done + systemunit.install(svc, text):
            print(line)
        for warning in [*systemunit.home_warnings(self.module), systemunit.boot_import_problem(self.module)]:
            if warning:
                print(warning, file=sys.stderr)
        print(f"its other commands, as root: {systemunit.admin_prefix()} {sys.executable} -m {self.module} "
              f"{'token' if self.role == 'server' else 'status'}")
        return 0

    def uninstall_service(self, args) -> int:
        svc = self.system_service(args)
        systemunit.require_root(svc, "uninstall-service")
        for line in systemunit.uninstall(svc):
            print(line)
        return 0

    # --- their options ----------------------------------------------------------------------

    def add_start_command(self, sub, example: str, add_run_options: Callable) -> argparse.ArgumentParser:
        start = sub.add_parser("start", help="run in the background under a supervisor", epilog=f"example: {example}")
        add_run_options(start, inherit=True)
        start.add_argument("--autostart", action="store_true",
                           help="also start at boot (systemd user unit or crontab)")
        return start

    def add_stop_command(self, sub) -> argparse.ArgumentParser:
        stop = sub.add_parser("stop", help=f"stop the background {self.role} and remove autostart",
                              epilog=f"example: python -m {self.module} stop")
        stop.add_argument("--keep-autostart", action="store_true", help="leave the start-at-boot entry in place")
        return stop

    def add_logs_command(self, sub, example: str) -> argparse.ArgumentParser:
        logs = sub.add_parser("logs", help=f"show the background {self.role}'s log", epilog=f"example: {example}")
        logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
        logs.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
        return logs

    def add_service_commands(self, sub, add_run_options: Callable) -> None:
        """install-service (with the run options the unit starts with) and uninstall-service."""
        unit = "chuantou-relay" if self.role == "server" else "chuantou-client"
        install = sub.add_parser("install-service", help=f"run at boot as the systemd system service {unit} "
                                 "(as root)", epilog=f"example: sudo python -m {self.module} install-service --print")
        add_run_options(install, inherit=True)
        install.add_argument("--print", action="store_true", help="show the unit without installing (no root needed)")
        install.add_argument("--user", metavar="NAME", help="run as this system user, made if missing (default: "
                             "a dynamic user systemd makes for the service)")
        uninstall = sub.add_parser("uninstall-service", help=f"stop, disable and remove {unit} (as root)",
                                   epilog=f"example: sudo python -m {self.module} uninstall-service")
        for command in (install, uninstall):
            command.add_argument("--root", default="/", help=argparse.SUPPRESS)  # tests: a staging root
        uninstall.set_defaults(user=None)

    def add_check_config_command(self, sub) -> argparse.ArgumentParser:
        check = sub.add_parser("check-config", help="validate the config file without starting anything: exit 0, "
                               "or 1 naming each problem", epilog=f"example: python -m {self.module} check-config "
                               "--config /path/to/file.json")
        check.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                           help="the file to check (default: the default one)")
        return check

    def check_config(self, path: Path, given: bool, problems: Callable[[Path], list[str]]) -> int:
        """``check-config``: "config OK: PATH" and 0, or each of ``problems(path)`` on stderr and 1.
        A file named with --config must exist; the default one may be missing (the defaults apply)."""
        if given and not path.exists():
            found = [f"config file {path} does not exist"]
        else:
            found = problems(path)
        if found:
            for problem in found:
                print(f"problem: {problem}", file=sys.stderr)
            print(f"config has {len(found)} problem{'s' if len(found) != 1 else ''}: {path}", file=sys.stderr)
            return 1
        print(f"config OK: {path}" + ("" if path.exists() else " (no file yet: the defaults apply)"))
        return 0

    def add_config_option(self, command: argparse.ArgumentParser) -> None:
        """--config on a command that talks to a running instance."""
        command.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                             help=f"the {self.role} started with this config file (default: the default one)")


def add_supervise_command(sub) -> None:
    supervise_command = sub.add_parser("_supervise")  # internal: the supervisor process
    supervise_command.add_argument("worker_args", nargs=argparse.REMAINDER)


def setup_logging(level: str) -> None:
    """Log lines to stdout (the supervisor copies them into the log file), with whatever a peer
    sent escaped (logsafe)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    logsafe.guard_handlers()


def role_of(files: service.ServiceFiles) -> str:
    return files.name.split("-", 1)[0]  # "server" or "client"


def stop_command(files: service.ServiceFiles, keep_autostart: bool) -> int:
    """``stop``: stop the background instance (or a foreground one) and remove autostart."""
    pid = stop_background(files)
    print(f"chuantou {role_of(files)} stopped (pid {pid})" if pid else f"chuantou {role_of(files)} is not running")
    if not keep_autostart:
        removed = remove_autostart(files)
        if removed:
            print(removed)
    return 0


def logs_command(files: service.ServiceFiles, lines: int, follow: bool) -> int:
    """``logs [-f] [-n N]``."""
    if not files.log_file.exists():
        print(f"no log yet at {files.log_file} (the log is written by: python -m chuantou_{role_of(files)} start)",
              file=sys.stderr)
        return 1
    for line in read_log_tail(files.log_file, lines):
        print(line)
    if follow:
        try:
            follow_log(files.log_file)
        except KeyboardInterrupt:
            pass
    return 0


def install_autostart_or_warn(files: service.ServiceFiles, module: str, args: list[str]) -> None:
    try:
        print(install_autostart(files, module, args))
    except config.ConfigError as exc:
        print(f"warning: {exc}", file=sys.stderr)


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a program that SIGPIPE ended


def run_command(commands: dict, args) -> int:
    """Run the chosen command; a ChuantouError becomes one line on stderr and exit code 1.

    Output piped into a reader that stops early (``token | head -n 1``) ends the command
    quietly, as SIGPIPE ends other tools, instead of with a traceback."""
    try:
        code = commands[args.command](args)
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe prints a traceback
        return code
    except ChuantouError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
