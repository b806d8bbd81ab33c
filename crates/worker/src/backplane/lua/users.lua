-- A snapshot of the online list: every user of every gateway run whose lease
-- is current, read atomically.
--
-- KEYS[1]  gateways: zset boot -> lease expiry (ms)
-- ARGV[1]  the users hash prefix
-- Returns { boot1, { ws, "opened_ms alias", ... }, boot2, { ... }, ... }.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, boot in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  out[#out + 1] = boot
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. boot)
end
return out
