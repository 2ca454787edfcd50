'use strict'
// outpost-miniprogram: the Outpost client for WeChat mini-programs (and,
// through require('outpost-miniprogram/node'), for Node). No dependencies.
const { createClient, Client, OutpostError } = require('./lib/client')
const { MqttClient } = require('./lib/mqtt')
const { wxPlatform } = require('./lib/wx')

module.exports = { createClient, Client, OutpostError, MqttClient, wxPlatform }
