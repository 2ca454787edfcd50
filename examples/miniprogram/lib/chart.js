// drawLine draws points [{ts, v}] as a line chart on a canvas context
// (wx.createCanvasContext), scaled to width × height with a small margin.
// It returns the drawn coordinates, which the tests check.
function drawLine (ctx, points, width, height) {
  const m = 8
  ctx.clearRect(0, 0, width, height)
  ctx.setStrokeStyle('#ccc')
  ctx.strokeRect(0, 0, width, height)
  const xy = []
  if (points.length) {
    let t0 = Infinity; let t1 = -Infinity; let lo = Infinity; let hi = -Infinity
    for (const p of points) {
      t0 = Math.min(t0, p.ts); t1 = Math.max(t1, p.ts)
      lo = Math.min(lo, p.v); hi = Math.max(hi, p.v)
    }
    const dt = t1 - t0 || 1
    const dv = hi - lo || 1
    for (const p of points) {
      xy.push([m + (p.ts - t0) / dt * (width - 2 * m), height - m - (p.v - lo) / dv * (height - 2 * m)])
    }
    ctx.beginPath()
    ctx.setStrokeStyle('#1aad19')
    ctx.setLineWidth(2)
    ctx.moveTo(xy[0][0], xy[0][1])
    for (let i = 1; i < xy.length; i++) ctx.lineTo(xy[i][0], xy[i][1])
    ctx.stroke()
    ctx.setFillStyle('#666')
    ctx.fillText(String(hi), m, m + 8)
    ctx.fillText(String(lo), m, height - m)
  }
  ctx.draw()
  return xy
}

module.exports = { drawLine }
