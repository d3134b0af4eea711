"""A screenshot of the chat page for the docs (a script, not a test): docs/serve_page.png.

    python benchmarks/serve_screenshot.py [--workdir /tmp/bb3x_serve_screenshot] [--steps 400]
                                          [--out docs/serve_page.png]

Why a real model: the picture shows what a user sees, replies included. The
workdir's model is served when it has checkpoints; otherwise the tiny preset
is trained there first (MLE on a synthetic release, a few minutes on 2 CPU
cores), so replies are words of the synthetic world rather than noise. Then
``main.py --mode=serve`` runs on a free loopback port, headless Chromium
(Debian's chromium and chromium-driver; nothing is downloaded) has a short
conversation, likes the first reply, opens the thumbs-down reasons of the
second with one chosen, and the window is saved as a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars")
MESSAGES = ("Hi! Do you have any hobbies?", "What kind of music do you like?")


def main_command(workdir: str, mode: str, *flags: str) -> list[str]:
    return [sys.executable, "main.py", "--config", "configs/cringe.py", f"--workdir={workdir}", f"--mode={mode}",
            "--config.data.synthetic.conversations=2000", "--config.data.tokenizer.vocab_size=1000", *flags]


def environment() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def train(workdir: str, steps: int) -> None:
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    print(f"training the tiny preset for {steps} steps in {workdir}", file=sys.stderr, flush=True)
    subprocess.run(main_command(workdir, "train", "--config.train.objective=mle", f"--config.train.steps={steps}",
                                "--config.data.batch_size=16", "--config.train.eval_every=100000",
                                "--config.train.eval_batches=0", f"--config.checkpoint.every_steps={steps}"),
                   cwd=REPO, env=environment(), check=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(workdir: str, folder: str):
    """The URL of ``main.py --mode=serve`` over ``workdir``, stopped (SIGTERM) on the way out."""
    import httpx

    port = free_port()
    process = subprocess.Popen(main_command(workdir, "serve", f"--config.serve.port={port}",
                                            f"--config.serve.folder={folder}", "--config.serve.max_batch=1"),
                               cwd=REPO, env=environment())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit status {process.poll()})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/settings", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def screenshot(url: str, out: str, profile: str, width: int, height: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:  # the page's own size (a window's size includes the browser's frame)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        wait = WebDriverWait(driver, 120, poll_frequency=0.1)
        driver.get(url + "/")
        wait.until(lambda d: d.execute_script("return state.conversationId"))
        for i, text in enumerate(MESSAGES, start=1):
            driver.find_element(By.ID, "input").send_keys(text)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.bot")) == i)
        first, second = driver.find_elements(By.CSS_SELECTOR, ".message.bot")
        first.find_element(By.CSS_SELECTOR, ".like").click()
        wait.until(lambda d: first.find_element(By.CSS_SELECTOR, ".rated").text)
        second.find_element(By.CSS_SELECTOR, ".dislike").click()
        second.find_element(By.CSS_SELECTOR, "input[value=nonsensical]").click()
        driver.execute_script("document.activeElement.blur()")
        time.sleep(0.3)
        driver.save_screenshot(out)
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bb3x_serve_screenshot", help="a trained workdir, or where to train")
    parser.add_argument("--steps", type=int, default=400, help="training steps when the workdir has no checkpoint")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "serve_page.png"))
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--height", type=int, default=760)
    args = parser.parse_args()
    train(args.workdir, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        with served(args.workdir, os.path.join(tmp, "deployment")) as url:
            screenshot(url, args.out, os.path.join(tmp, "profile"), args.width, args.height)
    print(args.out)


if __name__ == "__main__":
    main()
