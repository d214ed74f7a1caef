// order-saga operator page: auto-refresh with a pause control, copy buttons for order ids.
// Plain script, served from the package (no CDN); the pages work without it.
(function () {
  "use strict";
  var body = document.body;
  var seconds = Number(body.dataset.refresh || 0);
  var control = document.getElementById("auto-refresh");
  var status = document.getElementById("auto-refresh-status");
  var KEY = "order-saga.refresh-paused";
  var timer = null;

  function paused() { return window.localStorage.getItem(KEY) === "1"; }

  function busy() {  // never reload under someone typing or choosing
    var el = document.activeElement;
    return el && /^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName) && el !== control;
  }

  function schedule() {
    if (timer) { clearTimeout(timer); timer = null; }
    if (!seconds || paused()) { if (status) status.textContent = "paused"; return; }
    if (status) status.textContent = "every " + seconds + " s";
    timer = setTimeout(function () {
      if (busy() || paused()) { schedule(); return; }
      window.location.reload();
    }, seconds * 1000);
  }

  if (control) {
    document.getElementById("auto-refresh-control").hidden = !seconds;
    control.checked = !paused();
    control.addEventListener("change", function () {
      window.localStorage.setItem(KEY, control.checked ? "0" : "1");
      schedule();
    });
  }
  schedule();

  document.querySelectorAll("button.copy").forEach(function (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      var text = button.dataset.copy;
      var done = function () { button.textContent = "✓"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () { select(button); });
      } else {
        select(button);
      }
    });
  });

  function select(button) {  // no clipboard API (plain http): select the id to copy by hand
    var code = button.parentElement.querySelector("code");
    var range = document.createRange();
    range.selectNodeContents(code);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
})();
