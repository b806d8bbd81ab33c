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
-- ARGV[3]  operation: 'renew' | 'up' | 'reap' | 'write'
-- renew:   ARGV[4..] boots to renew
-- up:      ARGV[4] boot, ARGV[5] tag: renews, and purges the tag's previous run
-- write:   ARGV[4..] triples boot, ws, "opened_ms alias" (listed) or "" (left)
-- Returns the number of gateway runs whose users were purged; for 'write',
-- the number of entries it changed.
--
-- Every worker reads the whole list again when the notification stream
-- moves, so it moves only for a real change: a socket re-attached to another
-- worker writes its entry again, unchanged, and a failover of thousands of
-- sockets must not make every worker read thousands of users per write.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local purged = 0
local changed = 0

-- Every worker follows this stream and reads the list again when it moves.
local function notify(what, n)
  if n > 0 then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '*', what, n)
  end
end

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
elseif ARGV[3] == 'write' then
  for i = 4, #ARGV, 3 do
    local hash, ws, value = ARGV[1] .. ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if value == '' then
      changed = changed + redis.call('HDEL', hash, ws)
    elseif redis.call('HGET', hash, ws) ~= value then
      redis.call('HSET', hash, ws, value)
      changed = changed + 1
    end
  end
  notify('changed', changed)
  return changed
elseif ARGV[3] == 'reap' then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, boot in ipairs(expired) do
    purge(boot)
  end
end
notify('purged', purged)
return purged
