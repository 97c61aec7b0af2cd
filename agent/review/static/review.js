// Keyboard shortcuts for the review queue: j/k move, a approve, e edit, r reject.
// Served from the app (CSP script-src 'self'); no inline script anywhere.
(function () {
  "use strict";

  function isField(el) {
    if (!el) return false;
    var tag = el.tagName;
    return tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT" || el.isContentEditable;
  }

  function byId(id) { return document.getElementById(id); }

  function move(step) {
    var items = Array.prototype.slice.call(document.querySelectorAll("nav.queue a.qitem"));
    if (!items.length) return;
    var cur = -1;
    items.forEach(function (a, i) { if (a.getAttribute("aria-current") === "true") cur = i; });
    var next = cur < 0 ? items[0] : items[cur + step];
    if (next) window.location.assign(next.href);
  }

  function press(id) {
    var b = byId(id);
    if (b && !b.disabled) b.click();
  }

  function focusField(id) {
    var f = byId(id);
    if (!f) return;
    f.focus();
    if (f.tagName === "TEXTAREA") f.setSelectionRange(f.value.length, f.value.length);
  }

  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var active = document.activeElement;
    if (isField(active)) {
      if (ev.key === "Escape") { active.blur(); ev.preventDefault(); }
      else if (ev.key === "Enter" && active.id === "reason") { ev.preventDefault(); press("reject"); }
      return;
    }
    switch (ev.key) {
      case "j": move(1); break;
      case "k": move(-1); break;
      case "a": press("approve"); break;
      case "e": focusField("draft"); break;
      case "r": focusField("reason"); break;
      default: return;
    }
    ev.preventDefault();
  });

  // Keep the selected email visible in a long queue.
  var current = document.querySelector('nav.queue a.qitem[aria-current="true"]');
  if (current && current.scrollIntoView) current.scrollIntoView({ block: "nearest" });

  var reject = byId("reject");
  if (reject) {
    reject.addEventListener("click", function (ev) {
      var reason = byId("reason");
      if (reason && !reason.value.trim()) {
        ev.preventDefault();
        reason.focus();
        reason.classList.add("missing");
      }
    });
  }

  // One submission per page: a second key press or click must not post again.
  var form = byId("review-form");
  if (form) {
    var sent = false;
    form.addEventListener("submit", function (ev) {
      if (sent) { ev.preventDefault(); return; }
      sent = true;
      form.classList.add("sending");
    });
  }
})();
