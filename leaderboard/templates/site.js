(function () {
  "use strict";
  function sortBy(table, col, th) {
    var cur = th.getAttribute("aria-sort");
    var dir = cur === "ascending" ? "descending" : cur === "descending" ? "ascending"
      : (th.getAttribute("data-first") || "ascending");
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir);
    var sign = dir === "ascending" ? 1 : -1, numeric = th.getAttribute("data-type") === "num";
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    function rank(r) { return Number(r.getAttribute("data-rank")); }
    rows.sort(function (a, b) {
      var va = a.cells[col].getAttribute("data-value"), vb = b.cells[col].getAttribute("data-value");
      var ma = va === null || va === "", mb = vb === null || vb === "";
      if (ma || mb) return ma === mb ? rank(a) - rank(b) : (ma ? 1 : -1);
      var c = numeric ? Number(va) - Number(vb) : va.localeCompare(vb);
      return c * sign || rank(a) - rank(b);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  var tables = document.querySelectorAll("table.board");
  Array.prototype.forEach.call(tables, function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = th.querySelector("button");
      if (button) button.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
})();
