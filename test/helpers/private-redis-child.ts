/**
 * A stand-in for a `slicewise` process that runs a data dir's private Redis (`node --import tsx` this file with
 * the data dir): prints `URL <url>` once the server is up, stops it on SIGTERM. Killed with -9, it leaves the
 * server running, as a killed `slicewise pipeline` would.
 */
import { startPrivateRedis } from '../../src/cli/redis-server.ts';

const redis = await startPrivateRedis(process.argv[2]!, { say: (line) => console.log(line) });
process.once('SIGTERM', () => void redis.stop().then(() => process.exit(0)));
console.log(`URL ${redis.url}`);
setInterval(() => {}, 1 << 30);
