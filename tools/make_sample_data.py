"""Writes the project's own sample data sets into data/ (deterministic: the same files every run).

- spo_train.jsonl / spo_test.jsonl: triple extraction from automotive fault reports, rows {"text", "answer"},
  the four relations of the reference task (部件故障, 性能故障, 组成, 检测工具), triples "head_relation_tail"
  joined by newlines;
- cls_train.jsonl / cls_test.jsonl: classification of owner reviews (1 positive, 0 negative), instruction rows;
- gen_train.jsonl / gen_test.jsonl: question generation from repair notes, instruction rows; the test rows
  carry a list of reference questions.

Every sentence is assembled from the templates and word lists below, written for this project.
    python tools/make_sample_data.py [--output_dir data] [--seed 7]
"""
import argparse
import json
import os
import random

CARS = ["一辆2015年的轿车", "一辆行驶八万公里的SUV", "某型号越野车", "一辆城市公交车", "一辆家用两厢车",
        "一辆混合动力汽车", "一辆重型卡车", "一辆七座商务车", "某品牌电动车", "一辆出租车"]
PART_FAULTS = {
    "发动机": ["抖动", "异响", "无法启动", "动力不足", "怠速不稳"],
    "变速箱": ["换挡冲击", "漏油", "打滑", "异响"],
    "刹车片": ["磨损严重", "异响", "制动无力"],
    "水泵": ["漏水", "异响", "不工作"],
    "空调压缩机": ["不工作", "异响", "制冷效果差"],
    "蓄电池": ["亏电", "鼓包", "无法充电"],
    "火花塞": ["积碳", "烧蚀", "点火不良"],
    "节气门": ["积碳", "卡滞", "开度异常"],
    "转向机": ["漏油", "沉重", "异响"],
    "大灯": ["不亮", "闪烁", "亮度不足"],
    "雨刮电机": ["不工作", "转速慢", "异响"],
    "散热风扇": ["常转", "不转", "低速转动"],
    "燃油泵": ["供油不足", "不工作", "噪声大"],
    "减震器": ["漏油", "失效", "异响"],
    "发电机": ["不发电", "电压不稳", "异响"],
}
QUANTITIES = {
    "机油压力": ["偏低", "过高", "不稳定"],
    "冷却液温度": ["过高", "偏低", "波动大"],
    "油耗": ["明显升高", "异常"],
    "怠速转速": ["偏高", "忽高忽低"],
    "充电电压": ["偏低", "过高"],
    "制动距离": ["变长", "不稳定"],
}
WHOLES = {
    "冷却系统": ["水泵", "散热风扇", "节温器"],
    "点火系统": ["火花塞", "点火线圈"],
    "制动系统": ["刹车片", "制动泵", "刹车盘"],
    "供油系统": ["燃油泵", "喷油嘴", "燃油滤清器"],
    "悬架系统": ["减震器", "稳定杆"],
    "充电系统": ["发电机", "蓄电池"],
}
TOOLS = {
    "万用表": ["电压", "电阻", "蓄电池"],
    "示波器": ["点火波形", "传感器信号"],
    "诊断仪": ["故障码", "数据流"],
    "红外测温仪": ["温度", "排气歧管"],
    "油压表": ["机油压力", "燃油压力"],
    "缸压表": ["气缸压力"],
}
OPENERS = ["故障现象：", "维修记录：", "客户反映：", "检修报告：", ""]
CONNECTORS = ["，同时", "，并且", "，随后发现", "，检查发现", "，而且"]
CLOSERS = ["。", "，需进一步检查。", "，已安排维修。", "，更换配件后恢复正常。"]


def fault_clause(rng):
    if rng.random() < 0.75:
        part = rng.choice(sorted(PART_FAULTS))
        fault = rng.choice(PART_FAULTS[part])
        return f"{part}{fault}", f"{part}_部件故障_{fault}"
    quantity = rng.choice(sorted(QUANTITIES))
    fault = rng.choice(QUANTITIES[quantity])
    return f"{quantity}{fault}", f"{quantity}_性能故障_{fault}"


def extra_clause(rng):
    if rng.random() < 0.5:
        whole = rng.choice(sorted(WHOLES))
        part = rng.choice(WHOLES[whole])
        return f"{whole}中的{part}已拆检", f"{part}_组成_{whole}"
    tool = rng.choice(sorted(TOOLS))
    target = rng.choice(TOOLS[tool])
    return f"用{tool}检测{target}", f"{tool}_检测工具_{target}"


def spo_row(rng):
    clauses, triples = [], []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        clause, triple = fault_clause(rng)
        if triple not in triples:
            clauses.append(clause)
            triples.append(triple)
    if rng.random() < 0.35:
        clause, triple = extra_clause(rng)
        clauses.append(clause)
        triples.append(triple)
    body = clauses[0] + "".join(rng.choice(CONNECTORS) + c for c in clauses[1:])
    km = rng.randrange(5, 300) * 1000
    text = f"{rng.choice(OPENERS)}{rng.choice(CARS)}行驶{km}公里后{body}{rng.choice(CLOSERS)}"
    return {"text": text, "answer": "\n".join(triples)}


GOOD = ["油耗很低", "空间宽敞", "动力充沛", "隔音很好", "操控灵活", "座椅舒适", "保养便宜", "做工扎实"]
BAD = ["油耗太高", "后排太挤", "加速无力", "噪音很大", "方向盘发飘", "座椅太硬", "保养太贵", "异响不断"]
CLS_PROMPT = "判断下面这条汽车车主评价是正面还是负面，正面回答1，负面回答0。评价："


def cls_row(rng):
    label = rng.random() < 0.5
    words = rng.sample(GOOD if label else BAD, 2)
    tail = rng.choice(["，总体很满意。", "，推荐购买。"] if label else ["，有点后悔。", "，不推荐。"])
    text = f"开了{rng.randrange(1, 30)}个月，{words[0]}，{words[1]}{tail}"
    return {"instruction": CLS_PROMPT, "input": text, "output": "1" if label else "0"}


GEN_PROMPT = "你现在是一个问题生成模型，请根据下面的维修记录生成一个问题，记录："


def gen_row(rng, references):
    part = rng.choice(sorted(PART_FAULTS))
    fault = rng.choice(PART_FAULTS[part])
    cause = rng.choice(["零件老化", "长期缺少保养", "线路接触不良", "密封件损坏", "使用了劣质配件"])
    fix = rng.choice(["更换了零件", "清洗并重新安装", "紧固了接头", "重新编程", "修复了线路"])
    text = f"{part}{fault}，原因是{cause}，维修人员{fix}后故障排除。"
    questions = [f"{part}{fault}是什么原因？", f"{part}{fault}怎么修？", f"为什么{part}会{fault}？"]
    output = questions if references else rng.choice(questions)
    return {"instruction": GEN_PROMPT, "input": text, "output": output}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    rng = random.Random(args.seed)
    sets = {
        "spo_train.jsonl": [spo_row(rng) for _ in range(400)],
        "spo_test.jsonl": [spo_row(rng) for _ in range(40)],
        "cls_train.jsonl": [cls_row(rng) for _ in range(200)],
        "cls_test.jsonl": [cls_row(rng) for _ in range(40)],
        "gen_train.jsonl": [gen_row(rng, references=False) for _ in range(200)],
        "gen_test.jsonl": [gen_row(rng, references=True) for _ in range(20)],
    }
    for name, rows in sets.items():
        write_jsonl(os.path.join(args.output_dir, name), rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
