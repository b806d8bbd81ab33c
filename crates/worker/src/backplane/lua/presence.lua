-- Presence: every user belongs to the run (boot id) of the gateway holding its
-- socket, and is listed while that run's lease in the `gateways` sorted set
-- (score: expiry, ms, Redis's clock) is current. Workers renew the lease of
-- every gateway linked to them; a gateway that dies is renewed by nobody, and
-- its users leave when the lease runs out (reaped here).
--
-- KEYS[1]  gateways: zset boot -> lease expiry (ms)
-- KEYS[2]  tags: hash gateway tag -> its latest boot
-- KEYS[3]  the notification stream every worker follows
-- ARGV[1]  the users hash prefix (`<prefix><boot>`: ws id -> "opened_ms alias")
-- ARGV[2]  lease length, ms
-- ARGV[3]  operation: 'renew' | 'up' | 'reap'
-- renew:   ARGV[4..] boots to renew
-- up:      ARGV[4] boot, ARGV[5] tag: renews, and purges the tag's previous run
-- Returns the number of gateway runs whose users were purged.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local purged = 0

local function purge(boot)
  redis.call('DEL', ARGV[1] .. boot)
  redis.call('ZREM', KEYS[1], boot)
  purged = purged + 1
end

if ARGV[3] == 'renew' then
  for i = 4, #ARGV do
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  end
elseif ARGV[3] == 'up' then
  local boot, tag = ARGV[4], ARGV[5]
  local old = redis.call('HGET', KEYS[2], tag)
  if old and old ~= boot then
    purge(old)
  end
  redis.call('HSET', KEYS[2], tag, boot)
  redis.call('ZADD', KEYS[1], now + lease, boot)
elseif ARGV[3] == 'reap' then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, boot in ipairs(expired) do
    purge(boot)
  end
end
if purged > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '*', 'purged', purged)
end
return purged
