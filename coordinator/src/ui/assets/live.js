// drover dashboard: live updates. Pages are complete without this script; with it, the
// content is fetched again and swapped in when the coordinator's state changes (server-sent
// events from /ui/events), at most every 2 seconds, keeping the scroll position and any
// filter being typed.
(function () {
  "use strict";
  if (!window.EventSource || !window.fetch || !window.DOMParser) return;
  var busy = false, again = false, last = 0;
  function refresh() {
    var active = document.activeElement;
    if (active && (active.tagName === "INPUT" || active.tagName === "SELECT")) { again = true; return; }
    if (busy) { again = true; return; }
    var wait = 2000 - (Date.now() - last);
    if (wait > 0) { busy = true; setTimeout(function () { busy = false; refresh(); }, wait); return; }
    busy = true; last = Date.now();
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.redirected || r.status === 401 || r.status === 303) { location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (text) {
        if (text === null) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("main"), main = document.getElementById("main");
        if (fresh && main) {
          main.replaceWith(document.importNode(fresh, true));
          document.body.setAttribute("data-updated", String(Date.now()));
        }
      })
      .catch(function () {})
      .then(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  var es = new EventSource("/ui/events");
  es.addEventListener("change", refresh);
  document.body && document.body.setAttribute("data-live", "1");
})();
