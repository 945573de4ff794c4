"""The web app end to end in a real headless browser: Debian's chromium driven by playwright.

`make test` installs chromium (apt) before the tests; playwright never downloads a browser here.
Screenshots are kept in test-artifacts/ (chat.png, arena.png)."""
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import PAIRS, ROOT
from playwright.sync_api import expect, sync_playwright

from serving import start_app

CHROMIUM = Path("/usr/bin/chromium")
# for a machine with no network, as root: no sandbox, no GPU, no calls to Google's services
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def server(sft_model, tmp_path_factory):
    """sample_gradio.py in a subprocess on a free loopback port, serving the tiny SFT model twice
    (the second time as a copy)."""
    tmp = tmp_path_factory.mktemp("browser")
    shutil.copytree(sft_model, tmp / "b")
    votes = tmp / "votes.jsonl"
    proc, url = start_app(tmp / "app.log", f"--models={sft_model},{tmp / 'b'}", f"--votes_path={votes}",
                          "--max_input_chars=40")
    yield url, votes, str(sft_model), str(tmp / "b")
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield b
        b.close()


def test_chat_and_arena_in_a_real_browser(server, browser):
    url, votes, name_a, name_b = server
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    hosts = set()
    page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
    page.goto(url)

    # chat: type a question, press send, the answer streams in; the status line has the speed
    question, answer = PAIRS[7]["question"], PAIRS[7]["answer"]
    page.locator("#chat-input textarea").fill(question)
    page.locator("#chat-send").click()
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text(answer, timeout=30_000)
    expect(chat).to_contain_text(question)
    expect(page.locator("#chat-status")).to_contain_text("tokens/s")
    page.screenshot(path=ARTIFACTS / "chat.png", full_page=True)
    # empty input is ignored; an overlong one is cut with a notice, and cut again to fit the model's context
    page.locator("#chat-send").click()
    page.locator("#chat-input textarea").fill("问" * 60)
    page.locator("#chat-input textarea").press("Enter")
    expect(page.get_by_text("已截断为前 40 字")).to_be_visible(timeout=30_000)
    expect(chat).to_contain_text("问" * 40)
    expect(chat).not_to_contain_text("问" * 41)
    expect(page.locator("#chat-status")).to_contain_text("输入过长：模型一次只能看 48 个 token，还要给回答留 12 个",
                                                         timeout=30_000)
    page.locator("#chat-clear").click()
    expect(chat).not_to_contain_text(question)
    assert "\ufffd" not in chat.inner_text()

    # arena: both answers stream side by side, each in its side's chat; a vote lands in the file and on the leaderboard
    page.get_by_role("tab", name="竞技场").click()
    question, answer = PAIRS[8]["question"], PAIRS[8]["answer"]
    side_a, side_b = page.locator("#answer-a"), page.locator("#answer-b")
    page.locator("#arena-input textarea").fill(question)
    page.locator("#arena-send").click()
    expect(page.locator("#arena-status")).to_contain_text("请投票", timeout=30_000)
    for side in (side_a, side_b):
        expect(side).to_contain_text(question)
        expect(side).to_contain_text(answer)
    page.locator("#vote-b").click()
    expect(page.locator("#leaderboard")).to_contain_text(name_b)
    expect(page.locator("#leaderboard")).to_contain_text("1016")
    page.screenshot(path=ARTIFACTS / "arena.png", full_page=True)
    record = json.loads(Path(votes).read_text(encoding="utf-8"))
    assert (record["model_a"], record["model_b"], record["vote"], record["answer_b"]) == (name_a, name_b, "b", answer)
    assert record["history_a"] == record["history_b"] == []  # the conversation's first round
    # a second vote on the same round is refused
    page.locator("#vote-a").click()
    expect(page.get_by_text("每轮一票")).to_be_visible()
    assert len(Path(votes).read_text(encoding="utf-8").splitlines()) == 1

    # a model that cannot be loaded gives a message in the page, not a stack trace
    b_input = page.locator("#arena-b input")
    b_input.fill("out-nowhere")
    b_input.press("Enter")
    page.locator("#arena-send").click()
    expect(side_b).to_contain_text(f"【出错】没有名为 'out-nowhere' 的模型（可选：{name_a}, {name_b}）", timeout=30_000)
    expect(page.locator("#arena-status")).to_contain_text("这一轮不能投票")
    expect(side_a).to_contain_text(re.compile(f"{answer}[\\s\\S]*{question}[\\s\\S]*{answer}"))  # A answered again
    # a classmate's URL that was not allowed at start is refused, not connected to
    b_input.fill("http://127.0.0.1:9")
    b_input.press("Enter")
    page.locator("#arena-send").click()
    expect(side_b).to_contain_text(re.compile(r"【出错】http://127\.0\.0\.1:9 不在允许的远程模型地址里，没有连接它"),
                                   timeout=30_000)
    # 清空 starts a new conversation on both sides
    page.locator("#arena-clear").click()
    for side in (side_a, side_b):
        expect(side).not_to_contain_text(question)
    assert hosts == {url.split("/")[2]}, hosts  # nothing fetched from anywhere else
