"""The web app (gptforge/serve/static/) in a real browser, against `gptforge serve` on loopback.

Needs Playwright for Python and Chromium at /usr/bin/chromium (Debian's `chromium` package; Playwright's
own browser download is never used; GPTFORGE_CHROMIUM points elsewhere). Without them these tests skip,
unless GPTFORGE_REQUIRE_BROWSER=1 (set by .ci/run), which makes that a failure.

GPTFORGE_SCREENSHOTS=DIR also runs test_screenshots, which trains a tiny model for a minute (so the pages
show words, not noise) and saves chat.png, completion.png (alternatives open), phone.png and
phone-chat.png there; the committed ones live in docs/screenshots/.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import socket
import string
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import REPO, WORDS

CHROMIUM = Path(os.environ.get("GPTFORGE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = os.environ.get("GPTFORGE_SCREENSHOTS")
WAIT_MS = 30_000  # generation on a busy CI machine; a tiny model normally takes well under a second
PERCENT = re.compile(r"^(<)?\d+(\.\d+)?%$")


def _missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install playwright; no browser download needed)"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set GPTFORGE_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing_browser()
    if reason:
        if os.environ.get("GPTFORGE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; GPTFORGE_REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _chat_checkpoint(path: Path, n_embd: int = 32, n_head: int = 2, block_size: int = 128,
                     train_steps: int = 0) -> Path:
    import torch

    from gptforge.checkpoint import save_checkpoint
    from gptforge.config import ModelConfig
    from gptforge.model import GPT
    from gptforge.tokenizer import CharTokenizer

    torch.manual_seed(0)
    # Characters, not bytes: every token is whole text, so no two of a step's alternatives share a name
    # (byte tokens holding part of a UTF-8 character all read U+FFFD and merge in the legacy logprobs dict).
    tok = CharTokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")
    tok.add_chat_tokens()
    model = GPT(ModelConfig(n_layer=2, n_head=n_head, n_embd=n_embd, block_size=block_size,
                            vocab_size=tok.vocab_size))
    if train_steps:
        _train_briefly(model, tok, train_steps)
    save_checkpoint(path, model, tok)
    return path


def _train_briefly(model, tok, steps: int) -> None:
    """Fit the word cycle of helpers.WORDS, as prose and as chat turns: enough for readable screenshots."""
    import torch

    rng = random.Random(0)
    T = model.config.block_size

    def sentences(n: int) -> list[str]:
        out = []
        for _ in range(n):
            start, k = rng.randrange(len(WORDS)), rng.randint(4, 9)
            out.append(" ".join(WORDS[(start + j) % len(WORDS)] for j in range(k)).capitalize() + ".")
        return out

    def example() -> list[int]:
        if rng.random() < 0.5:
            ids = tok.encode("\n".join(sentences(T // 10)))
        else:
            turns = [{"role": role, "content": " ".join(sentences(1))}
                     for _ in range(T // 40) for role in ("user", "assistant")]
            ids = tok.encode_chat(turns)[0]
        return (ids + [tok.eot_id] * (T + 1))[:T + 1]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = torch.tensor([example() for _ in range(2048 // T)])  # (B, T + 1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(ckpt: Path, tmp: Path):
    """`python -m gptforge serve` in a subprocess on a free loopback port: {"url", "info"}."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPTFORGE_CACHE": str(tmp / "cache")}
    log = (tmp / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(ckpt), "--port", str(port)],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"gptforge serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"gptforge serve did not answer /health within 90 s:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        with urllib.request.urlopen(base + "/v1/gptforge/info", timeout=5) as r:
            info = json.load(r)
        yield {"url": base, "info": info}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    # Depends on browser so that a missing browser skips before a server starts.
    tmp = tmp_path_factory.mktemp("webapp")
    with _serving(_chat_checkpoint(tmp / "ckpt"), tmp) as s:
        yield s


def _new_page(browser, **context_args):
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **context_args})
    page = context.new_page()
    page.errors = []  # uncaught exceptions in the page's own script fail the test, as do CSP violations
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda msg: page.errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    return page


@pytest.fixture
def page(browser):
    page = _new_page(browser)
    yield page
    errors = page.errors
    page.context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def _post_bodies(page, path: str) -> list[dict]:
    bodies: list[dict] = []
    page.on("request", lambda req: bodies.append(req.post_data_json)
            if req.method == "POST" and req.url.endswith(path) else None)
    return bodies


def _set(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def _open(page, server, hash_: str = "") -> None:
    from playwright.sync_api import expect

    page.goto(server["url"] + "/" + hash_)
    # The model panel fills in once /v1/gptforge/info has answered.
    expect(page.locator("#info-context")).to_have_text(f"{server['info']['context_length']} tokens")


def _generate_completion(page, prompt: str, k: int, max_tokens: int) -> list[tuple[str, float, dict]]:
    """Generate in completion mode; returns what the server streamed: (token, logprob, top_logprobs)."""
    from playwright.sync_api import expect

    page.click("#tab-completion")
    _set(page, "#prompt-input", prompt)
    _set(page, "#top-k-shown", str(k))
    _set(page, "#max-tokens", str(max_tokens))
    _set(page, "#seed", "7")
    with page.expect_response(lambda r: r.url.endswith("/v1/completions")) as response:
        page.click("#completion-generate")
    expect(page.locator("#completion-output")).not_to_have_attribute("aria-busy", "true", timeout=WAIT_MS)
    expect(page.locator("#error-banner")).to_be_hidden()
    steps = []
    for line in response.value.text().splitlines():
        if line.startswith("data: {"):
            lp = json.loads(line[6:])["choices"][0]["logprobs"]
            if lp and lp["tokens"]:  # a last chunk may release held-back text with no new token
                steps += zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])
    return steps


def test_web_app_is_native_modules_without_inline_script():
    """No build step: index.html loads app.js as a module (no inline script: the CSP allows none), and every
    module is a file in static/ that app.js reaches through relative imports."""
    static = REPO / "gptforge" / "serve" / "static"
    html = (static / "index.html").read_text()
    assert re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S) == [(' type="module" src="/static/app.js"', "")]
    reached, todo = set(), ["app.js"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            assert (static / name).is_file(), f"a module imports {name}, which is not in static/"
            todo += re.findall(r'^import .* from "\./([\w.-]+)";$', (static / name).read_text(), re.M)
    assert reached == {p.name for p in static.glob("*.js")}


def test_chat_streams_reply_and_sends_history(page, server):
    from playwright.sync_api import expect

    _open(page, server)
    info = server["info"]
    assert info["chat"] is True
    expect(page.locator("#tab-chat")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#info-parameters")).to_contain_text(f"{info['parameters']:,}")
    expect(page.locator("#info-device")).to_contain_text(info["device"])
    assert info["weights"] == "f32"  # --quantize auto on a CPU
    expect(page.locator("#info-device")).to_contain_text("f32 weights")
    # Count text-node updates in the transcript: a streamed reply arrives in several pieces.
    page.evaluate("""() => {
        window.__deltas = 0;
        new MutationObserver((ms) => { window.__deltas += ms.filter(m => m.type === 'characterData').length; })
            .observe(document.getElementById('transcript'), {subtree: true, characterData: true});
    }""")
    bodies = _post_bodies(page, "/v1/chat/completions")
    _set(page, "#seed", "1234")
    _set(page, "#max-tokens", "24")

    page.fill("#chat-input", "Hello there")
    page.press("#chat-input", "Enter")
    expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=WAIT_MS)
    replies = page.locator(".msg-assistant .msg-text")
    expect(replies).to_have_count(1)
    first = replies.nth(0).text_content()
    assert first.strip(), "the assistant reply is empty"
    assert page.evaluate("window.__deltas") >= 2, "the reply did not stream in pieces"
    expect(page.locator("#chat-input")).to_have_value("")

    page.fill("#chat-input", "Tell me more")
    page.click("#chat-send")
    expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator(".msg")).to_have_count(4)
    expect(page.locator("#error-banner")).to_be_hidden()

    assert len(bodies) == 2
    assert bodies[0]["stream"] is True and bodies[0]["seed"] == 1234 and bodies[0]["max_tokens"] == 24
    assert bodies[0]["messages"] == [{"role": "user", "content": "Hello there"}]
    assert bodies[1]["messages"] == [{"role": "user", "content": "Hello there"},
                                     {"role": "assistant", "content": first},
                                     {"role": "user", "content": "Tell me more"}]

    # A conversation longer than the context window (128 tokens): the page sends all it has with
    # truncate_history, the server leaves the oldest exchanges out and says how many, the page marks them.
    long_message = "Where does the knight ride with his sword and shield to find the lost crown today?"
    dropped = _chat(page, long_message)
    expect(page.locator(".msg")).to_have_count(6)
    assert len(bodies) == 3 and bodies[2]["truncate_history"] is True
    assert bodies[2]["messages"] == _transcript(page)[:5]  # the whole history, no retries
    assert dropped in (2, 4)
    left_out = page.locator(".msg.out-of-context")
    expect(left_out).to_have_count(dropped)
    expect(page.locator(".msg").nth(0)).to_have_class(re.compile("out-of-context"))
    expect(left_out.nth(0)).to_contain_text("left out")

    # It keeps chatting: what was left out is not sent again, and the server leaves out more as needed.
    kept = _transcript(page)[dropped:]
    more = _chat(page, "And then?")
    expect(page.locator(".msg")).to_have_count(8)
    assert len(bodies) == 4 and bodies[3]["messages"] == [*kept, {"role": "user", "content": "And then?"}]
    expect(left_out).to_have_count(dropped + more)

    # The conversation survives a reload (sessionStorage) and Clear empties it.
    page.reload()
    expect(page.locator(".msg")).to_have_count(8)
    expect(page.locator(".msg.out-of-context")).to_have_count(dropped + more)
    page.click("#chat-clear")
    expect(page.locator(".msg")).to_have_count(0)


def _chat(page, message: str) -> int:
    """Send a chat message and wait for the reply; returns how many messages the server left out."""
    from playwright.sync_api import expect

    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as response:
        page.fill("#chat-input", message)
        page.click("#chat-send")
    expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#error-banner")).to_be_hidden()
    return int(response.value.headers["x-gptforge-dropped-messages"])


def _transcript(page) -> list[dict]:
    """The conversation on the page, as the API's messages."""
    return page.locator(".msg").evaluate_all("""els => els.map(e => ({
        role: e.classList.contains('msg-user') ? 'user' : 'assistant',
        content: e.querySelector('.msg-text').textContent}))""")


def test_completion_shows_token_alternatives(page, server):
    from playwright.sync_api import expect

    _open(page, server, "#completion")
    bodies = _post_bodies(page, "/v1/completions")
    k = 4
    steps = _generate_completion(page, "The king", k=k, max_tokens=20)
    assert bodies and bodies[0]["logprobs"] == k and bodies[0]["stream"] is True
    tokens = page.locator("#generated .tok")
    n = tokens.count()
    assert n == len(steps) and 1 <= n <= 20
    expect(page.locator("#completion-status")).to_contain_text(f"{n} token")
    # Each streamed token is on the page, coloured by the probability of the chosen token.
    for j, (text, logprob, _) in enumerate(steps):
        assert tokens.nth(j).text_content() == (_visible(text) if not text.strip() else text)
        p = float(tokens.nth(j).evaluate("el => el.style.getPropertyValue('--p')"))
        assert math.isclose(p, math.exp(logprob), abs_tol=1e-3)

    pop = page.locator("#tokpop")
    expect(pop).to_be_hidden()
    i = min(2, n - 1)
    tokens.nth(i).click()
    expect(pop).to_be_visible()
    expect(page.locator("#tokpop-title")).to_contain_text(f"Step {i + 1} of {n}")
    rows = page.locator("#tokpop-list li")
    chosen = page.locator("#tokpop-list li.chosen")
    expect(chosen).to_have_count(1)
    expect(chosen).to_have_attribute("aria-current", "true")
    expect(chosen.locator(".badge")).to_have_text("chosen")
    # The k alternatives the server sent, most likely first, with percentages; the chosen token gets a
    # row of its own below them when sampling picked one outside the top k.
    text, logprob, top = steps[i]
    assert len(top) == k
    expected = sorted(top.items(), key=lambda kv: -kv[1])
    if text not in top:
        expected.append((text, logprob))
    expect(rows).to_have_count(len(expected))
    expect(page.locator("#tokpop-list li.outside")).to_have_count(0 if text in top else 1)
    assert rows.locator(".alt-tok").all_text_contents() == [_visible(t) for t, _ in expected]
    for shown, (_, lp) in zip(rows.locator(".alt-p").all_text_contents(), expected):
        assert PERCENT.match(shown), shown
        if not shown.startswith("<"):
            # shown to 3 significant figures from 10%, 2 below
            assert math.isclose(float(shown.rstrip("%")), 100 * math.exp(lp), rel_tol=0.05)
    assert chosen.locator(".alt-tok").text_content() == _visible(text)

    # Keyboard: the clicked token has focus; arrows move between tokens, Escape closes.
    if n > i + 1:
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.dataset.i") == str(i + 1)
        expect(page.locator("#tokpop-title")).to_contain_text(f"Step {i + 2} of {n}")
    page.keyboard.press("Escape")
    expect(pop).to_be_hidden()
    # Hover previews a token; leaving the output hides the preview again.
    tokens.nth(0).hover()
    expect(page.locator("#tokpop-title")).to_contain_text(f"Step 1 of {n}")
    page.mouse.move(5, 5)
    expect(pop).to_be_hidden()


def _visible(text: str) -> str:
    """A token as the page writes it in the alternatives (and whitespace-only tokens in the text)."""
    return text.replace(" ", "\u00b7").replace("\n", "\u21b5") if text else "\u2205"


def test_phone_width_has_no_horizontal_overflow(browser, server):
    from playwright.sync_api import expect

    page = _new_page(browser, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    try:
        _open(page, server)
        overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        assert page.evaluate(overflow) <= 0
        _set(page, "#max-tokens", "16")
        page.fill("#chat-input", "Hi")
        page.click("#chat-send")
        expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=WAIT_MS)
        assert page.evaluate(overflow) <= 0

        _generate_completion(page, "A long prompt " * 4, k=5, max_tokens=40)
        tokens = page.locator("#generated .tok")
        tokens.nth(tokens.count() - 1).tap()
        expect(page.locator("#tokpop")).to_be_visible()
        box = page.locator("#tokpop").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        assert page.evaluate(overflow) <= 0
        assert not page.errors, page.errors
    finally:
        page.context.close()


def test_errors_and_api_key(page, server):
    from playwright.sync_api import expect

    _open(page, server, "#completion")
    # The page sends the key it was given.
    page.click("#connection summary")
    page.fill("#api-key", "sk-test")
    page.click("#key-form button[type=submit]")
    headers = []
    page.on("request", lambda req: headers.append(req.headers.get("authorization"))
            if req.url.endswith("/v1/completions") else None)
    _generate_completion(page, "x", k=1, max_tokens=2)
    assert headers == ["Bearer sk-test"]

    # OpenAI error JSON from the server is shown in the banner, and the page recovers.
    message = "prompt is too long: 5000 tokens, the context window is 128"
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=400, content_type="application/json",
        body=json.dumps({"error": {"message": message, "type": "invalid_request_error"}})))
    page.click("#completion-generate")
    expect(page.locator("#error-banner")).to_be_visible()
    expect(page.locator("#error-text")).to_have_text(message)
    expect(page.locator("#completion-generate")).to_be_enabled()
    page.click("#error-close")
    expect(page.locator("#error-banner")).to_be_hidden()


def test_checkpoint_without_chat_template_offers_completion(page, server):
    from playwright.sync_api import expect

    info = {**server["info"], "chat": False}
    page.route("**/v1/gptforge/info", lambda route: route.fulfill(json=info))
    _open(page, server)
    # With no mode asked for, a model that cannot chat opens in completion mode...
    expect(page.locator("#tab-completion")).to_have_attribute("aria-selected", "true")
    page.click("#tab-chat")
    # ...and chat mode says why it is unavailable and links to completion.
    expect(page.locator("#chat-unavailable")).to_be_visible()
    expect(page.locator("#chat-input")).to_be_disabled()
    page.click("#go-completion")
    expect(page.locator("#panel-completion")).to_be_visible()


@pytest.mark.skipif(not SCREENSHOTS, reason="set GPTFORGE_SCREENSHOTS=DIR to write the web app's screenshots")
def test_screenshots(browser, tmp_path):
    from playwright.sync_api import expect

    out = Path(SCREENSHOTS)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _chat_checkpoint(tmp_path / "tiny-chat", n_embd=64, n_head=4, block_size=256, train_steps=800)
    with _serving(ckpt, tmp_path) as server:
        page = _new_page(browser)
        _open(page, server)
        _set(page, "#max-tokens", "60")
        for seed, message in (("3", "Where does the knight ride?"), ("5", "And the fool?")):
            _set(page, "#seed", seed)
            page.fill("#chat-input", message)
            page.press("#chat-input", "Enter")
            expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=WAIT_MS)
        page.fill("#chat-input", "Who sings of love?")
        page.screenshot(path=str(out / "chat.png"))

        _generate_completion(page, "The king and", k=5, max_tokens=120)
        page.locator("#generated .tok").nth(_least_likely_on_last_line(page)).click()
        page.screenshot(path=str(out / "completion.png"))
        assert not page.errors, page.errors
        page.context.close()

        page = _new_page(browser, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
        _open(page, server, "#completion")
        _generate_completion(page, "The queen", k=5, max_tokens=60)
        token = page.locator("#generated .tok").nth(_least_likely_on_last_line(page))
        token.evaluate("el => el.scrollIntoView({block: 'center'})")  # room for the popup below it
        token.tap()
        page.screenshot(path=str(out / "phone.png"))
        page.click("#tab-chat")
        _set(page, "#max-tokens", "60")
        page.fill("#chat-input", "Where is the lost crown?")
        page.press("#chat-input", "Enter")
        expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=WAIT_MS)
        page.screenshot(path=str(out / "phone-chat.png"))
        assert not page.errors, page.errors
        page.context.close()


def _least_likely_on_last_line(page) -> int:
    """The token whose alternatives make the best picture: the least likely one on the last line, so the
    popup opens below the text rather than over it."""
    return page.locator("#generated .tok").evaluate_all("""els => {
        const bottom = Math.max(...els.map(el => el.getBoundingClientRect().top));
        let best = els.length - 1;
        els.forEach((el, i) => {
            const p = Number(el.style.getPropertyValue('--p'));
            if (el.getBoundingClientRect().top === bottom && p < Number(els[best].style.getPropertyValue('--p'))) best = i;
        });
        return best;
    }""")
