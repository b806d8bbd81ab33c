-- The log's name, created when the log has none (a new Redis, or one that
-- lost its data: then ids start over under a new name).
--
-- KEYS[1]  the meta hash
-- ARGV[1]  the epoch to set if there is none
-- Returns { epoch, last id }.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
return { epoch, tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') }
