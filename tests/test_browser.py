"""
serve.py's page in a real browser: headless Chromium driven by selenium, against a serve.py
subprocess with a tiny random char-level model. Skipped when chromium, chromedriver or
selenium are not installed (apt-get install chromium chromium-driver; pip install selenium).
"""
import os
import pickle
import shutil

import pytest

from test_serve import TEXT, project_dataset, start_server, stop_server, tiny_run_overrides, write_checkpoint
from tokenizer import train_bpe

CHROMIUM, CHROMEDRIVER = shutil.which('chromium') or '/usr/bin/chromium', '/usr/bin/chromedriver'
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("chromium and chromium-driver are not installed", allow_module_level=True)
webdriver = pytest.importorskip('selenium.webdriver')
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

os.environ.setdefault('SE_OFFLINE', 'true')  # selenium-manager must never try to download a driver


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp('browser')
    return folder, write_checkpoint(folder / 'out-tiny')


@pytest.fixture(scope='module')
def url(tiny):
    folder, out_dir = tiny
    proc, url = start_server(str(folder), out_dir, '--max_tokens_limit=4000')
    yield url
    if proc.poll() is None:
        stop_server(proc)


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp('chromium-profile')
    for flag in ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--disable-dev-shm-usage', f'--user-data-dir={profile}', '--window-size=1200,1000']:
        options.add_argument(flag)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})  # the console, for its errors
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60):
    # the page rebuilds parts of itself as data arrives: an element found a moment ago may be gone
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition())


def by_id(driver, element_id):
    return driver.find_element(By.ID, element_id)


def cell(driver, name):
    # read in one script: the table is rebuilt on every refresh, so a found element can go stale
    return driver.execute_script("const td = document.querySelector(`#model-info td[data-field='${arguments[0]}']`);"
                                 "return td ? td.textContent : null;", name)


def value(driver, element_id):
    return driver.execute_script("return document.getElementById(arguments[0]).value", element_id)


def set_value(driver, element_id, value):
    # like a user dragging a slider or typing: set the value, then fire the events the page listens to
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                          element_id, str(value))


def test_generate_streams_into_the_page(browser, url, tmp_path):
    browser.get(url)
    wait(browser, lambda: by_id(browser, 'model-name').text == 'out-tiny')
    # a base model: the page opens on Generate, sampling at 0.8 in both tabs; the icon is there
    assert 'active' in by_id(browser, 'tab-generate').get_attribute('class')
    assert by_id(browser, 'gen-prompt').get_attribute('value') == 'ROMEO:'
    assert value(browser, 'gen-temperature') == value(browser, 'chat-temperature') == '0.8'
    assert browser.execute_async_script("fetch('/favicon.ico').then(r => arguments[0]("
                                        "[r.status, r.headers.get('Content-Type')]))") == [200, 'image/svg+xml']
    assert by_id(browser, 'api-key').get_attribute('placeholder') == 'not needed'
    set_value(browser, 'gen-prompt', 'the quick')
    set_value(browser, 'gen-max-tokens', 3000)
    by_id(browser, 'gen-run').click()
    # the text grows while the request is still running: it streams
    wait(browser, lambda: len(by_id(browser, 'gen-text').text) > 20
         and by_id(browser, 'gen-output').get_attribute('data-state') == 'running')
    by_id(browser, 'gen-cancel').click()
    wait(browser, lambda: by_id(browser, 'gen-output').get_attribute('data-state') == 'done')
    assert by_id(browser, 'gen-status').text == 'stopped'

    set_value(browser, 'gen-max-tokens', 40)
    set_value(browser, 'gen-seed', 7)
    by_id(browser, 'gen-run').click()
    wait(browser, lambda: by_id(browser, 'gen-output').get_attribute('data-state') == 'done')
    assert len(browser.execute_script("return document.getElementById('gen-text').textContent")) == 40
    assert by_id(browser, 'gen-output').text.startswith('the quick')
    assert by_id(browser, 'gen-status').text.startswith('40 tokens in'), by_id(browser, 'gen-status').text
    browser.save_screenshot(str(tmp_path / 'generate.png'))


def test_chat_tab(browser, url, tmp_path):
    browser.get(url)
    by_id(browser, 'tab-chat').click()
    set_value(browser, 'chat-max-tokens', 30)
    by_id(browser, 'chat-input').send_keys('the fox?')
    by_id(browser, 'chat-send').click()
    wait(browser, lambda: by_id(browser, 'chat-status').text.startswith('finish'))
    messages = browser.find_elements(By.CSS_SELECTOR, '#chat-log .msg')
    assert [m.get_attribute('class') for m in messages] == ['msg user', 'msg assistant']
    assert 'the fox?' in messages[0].text
    browser.save_screenshot(str(tmp_path / 'chat.png'))


def test_a_chat_model_opens_on_the_chat_tab_greedy(browser, tmp_path):
    # a chat model: its tokenizer renders turns with special tokens (a small BPE here)
    out_dir = write_checkpoint(tmp_path / 'out-chat', vocab_size=300, meta=False)
    with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(train_bpe([TEXT * 20], 300), f)
    proc, url = start_server(str(tmp_path), out_dir)
    try:
        browser.get_log('browser')  # from here on: this page's console
        browser.get(url)
        wait(browser, lambda: 'active' in by_id(browser, 'tab-chat').get_attribute('class'))
        assert by_id(browser, 'panel-chat').is_displayed() and not by_id(browser, 'panel-generate').is_displayed()
        # greedy, as its held-out questions are scored; no Shakespeare prompt waiting in Generate
        assert value(browser, 'chat-temperature') == '0' and by_id(browser, 'chat-temperature-value').text == '0'
        assert value(browser, 'gen-prompt') == ''
        set_value(browser, 'chat-max-tokens', 20)
        by_id(browser, 'chat-input').send_keys('the fox?\n')
        wait(browser, lambda: by_id(browser, 'chat-status').text.startswith('finish'))
        # nothing failed to load, the icon included
        assert [e for e in browser.get_log('browser') if e['level'] == 'SEVERE'] == []
        browser.save_screenshot(str(tmp_path / 'chat-model.png'))
    finally:
        stop_server(proc)


def test_train_tab_draws_the_loss_chart(browser, url, tiny, tmp_path):
    with project_dataset() as dataset:
        train_from_the_page(browser, url, tiny_run_overrides(dataset, str(tmp_path / 'out-run'), max_iters=30), tmp_path)


def train_from_the_page(browser, url, overrides, tmp_path):
    browser.get(url)
    by_id(browser, 'tab-train').click()
    wait(browser, lambda: 'train_shakespeare_char_cpu.py' in by_id(browser, 'train-config').text)
    Select(by_id(browser, 'train-config')).select_by_value('train_shakespeare_char_cpu.py')
    set_value(browser, 'train-overrides', '\n'.join(overrides))
    by_id(browser, 'train-start').click()
    chart = by_id(browser, 'train-chart')
    wait(browser, lambda: int(chart.get_attribute('data-val-points')) >= 3
         and int(chart.get_attribute('data-train-points')) >= 10, timeout=120)
    assert len(browser.find_elements(By.CSS_SELECTOR, '#train-chart circle.point.val')) >= 3
    assert len(browser.find_elements(By.CSS_SELECTOR, '#train-chart polyline')) == 2
    assert 'step 0: train loss' in by_id(browser, 'train-log').text
    wait(browser, lambda: by_id(browser, 'train-status').text.startswith('finished'), timeout=120)
    assert by_id(browser, 'train-status').text == 'finished (exit code 0)'
    browser.save_screenshot(str(tmp_path / 'train.png'))


def test_model_tab_and_loading(browser, url, tmp_path):
    browser.get(url)
    by_id(browser, 'tab-model').click()
    wait(browser, lambda: cell(browser, 'checkpoint iteration') == '3')
    assert cell(browser, 'best val loss') == '3.2500'
    other = write_checkpoint(tmp_path / 'out-other', iter_num=42)
    set_value(browser, 'model-out-dir', other)
    by_id(browser, 'model-load').click()
    wait(browser, lambda: by_id(browser, 'model-status').text.startswith('loaded out-other'))
    wait(browser, lambda: cell(browser, 'checkpoint iteration') == '42')
    assert by_id(browser, 'model-name').text == 'out-other'
    browser.save_screenshot(str(tmp_path / 'model.png'))


def test_api_key_from_the_page(browser, tiny, tmp_path):
    folder, out_dir = tiny
    proc, url = start_server(str(tmp_path), out_dir, '--api_key=sekret')
    try:
        browser.get(url)
        wait(browser, lambda: by_id(browser, 'model-name').text == 'API key needed')
        assert by_id(browser, 'api-key').get_attribute('placeholder') == 'needed'
        set_value(browser, 'api-key', 'sekret')  # the change event stores it and retries
        wait(browser, lambda: by_id(browser, 'model-name').text == 'out-tiny')
        assert browser.execute_script("return localStorage.getItem('nanogpt_api_key')") == 'sekret'
        set_value(browser, 'gen-max-tokens', 10)
        by_id(browser, 'gen-run').click()
        wait(browser, lambda: by_id(browser, 'gen-output').get_attribute('data-state') == 'done')
        assert by_id(browser, 'gen-status').text.startswith('10 tokens')
        browser.execute_script("localStorage.removeItem('nanogpt_api_key')")
    finally:
        stop_server(proc)
