// Where the app finds Outpost. Point edges at your edge's advertised URL
// (it must be on the mini-program's request and socket domain lists), or
// give cloud (and location) to let the cloud pick the nearest edge.
module.exports = {
  edges: ['http://127.0.0.1:8080'],
  cloud: '',
  location: null,
  // Against an edge started with -dev-login only: log in as this openid
  // instead of sending wx.login's code. Leave '' in a real app.
  devCode: 'dev:admin'
}
