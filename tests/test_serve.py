import asyncio, sqlite3
from batch.config import load_config
from batch.service.web import app


def test_explore(results_env, tmp_path):
    ds = app.build(load_config(results_env.config_path), tmp_path / "cache")
    async def go():
        out = {}
        for url in ["/", "/vlbatch", "/vlbatch/results", "/-/gallery", "/-/charts", "/vlbatch/latest_answers.json",
                    "/vlbatch.json?sql=DELETE+FROM+jobs", "/-/gallery?q=%22", "/-/gallery?since=bogus"]:
            r = await ds.client.get(url)
            out[url] = (r.status_code, r.text)
        return out
    out = asyncio.run(go())
    for k, (s, t) in out.items():
        open("/tmp/explore/" + k.replace("/", "_")[:60] + ".html", "w").write(t)
        print(k, s, len(t))
    conn = sqlite3.connect(results_env.db_path)
    for row in conn.execute("select jr.job_id, jr.media_paths, r.answer, r.error from job_results jr join results r on r.id=jr.result_id"):
        print(row)
    print(results_env.root)
    ds.vlbatch_state.thumbnails.close()
